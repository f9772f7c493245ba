"""Our vision tower (SDPA attention) against transformers' BlipVisionModel + vision_proj, fp32."""

import torch
import torch.nn.functional as F
from transformers import BlipForImageTextRetrieval

from blipsearch.retrieval.models.blip_vision import BlipVisionTower, VisionTowerConfig


def test_features_and_embeddings_equal_transformers(tiny_model_dir):
    reference = BlipForImageTextRetrieval.from_pretrained(tiny_model_dir).eval()
    tower = BlipVisionTower(VisionTowerConfig.from_blip_config(reference.config.to_dict())).eval()
    tower.load_weights(dict(reference.state_dict()))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.vision_model(pixel_values=pixels).last_hidden_state
        expected_embeddings = F.normalize(reference.vision_proj(expected[:, 0]), dim=-1)
        features, embeddings = tower(pixels)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeddings, expected_embeddings, atol=1e-5, rtol=1e-5)
    assert features.std(dim=0).mean() > 0.05  # images differ: the comparison has teeth


def test_fused_linear_gelu_equals_the_plain_fp32_computation(monkeypatch):
    """The one-call oneDNN linear+gelu (bf16 on CPU) against gelu(linear(x)) in float64; the two-call path that
    fp32, autocast and CPUs without it take, too (under autocast: the same dtype as the plain calls give)."""
    from blipsearch.retrieval.models import layers

    generator = torch.Generator().manual_seed(0)
    linear = layers.Linear(48, 96)
    linear.weight.data = torch.randn(96, 48, generator=generator) * 0.2
    linear.bias.data = torch.randn(96, generator=generator) * 0.2
    x = torch.randn(2, 7, 48, generator=generator)
    expected = F.gelu(F.linear(x.double(), linear.weight.double(), linear.bias.double()))
    assert (expected < 0).any() and (expected > 1).any()  # both of gelu's regimes are exercised
    bf16 = layers.Linear(48, 96).to(torch.bfloat16)
    bf16.weight.data, bf16.bias.data = linear.weight.data.bfloat16(), linear.bias.data.bfloat16()
    paths = [False, True] if layers._fused_linear_available() else [False]  # the fused one where this CPU has it
    for fused in paths:
        monkeypatch.setattr(layers, "_fused_linear_available", lambda fused=fused: fused)
        with torch.no_grad():
            torch.testing.assert_close(layers.linear_gelu(x, linear).double(), expected, atol=1e-5, rtol=1e-5)
            out = layers.linear_gelu(x.bfloat16(), bf16)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mixed, plain = layers.linear_gelu(x, linear), F.gelu(F.linear(x, linear.weight, linear.bias))
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), expected, atol=0.05, rtol=0.02)  # bf16 inputs: ~3 digits
        assert mixed.dtype == plain.dtype == torch.bfloat16  # autocast's bf16, not an fp32 oneDNN call
        torch.testing.assert_close(mixed, plain)


def test_fused_bf16_attention_equals_the_plain_fp32_computation():
    """`layers.attention` in bf16 on CPU (oneDNN Graph's fused kernel) against softmax(q k^T / sqrt(d)) v in
    float64, at an uneven token count; every call and every batch gives the same bits for the same rows."""
    from blipsearch.retrieval.models import layers

    fusing = torch.backends.mkldnn.is_available() and hasattr(torch.jit, "enable_onednn_fusion") \
        and not layers._has_amx()
    if fusing:
        assert layers._onednn_graph_attention(32, 0) is not None  # the fast path exists on this torch
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 37, 32, generator=generator) for _ in range(3))
    q = q * 3  # peaked attention: each output leans on a few positions
    q, k, v = (t.bfloat16().float() for t in (q, k, v))  # the inputs' own rounding is not the kernel's error
    scores = q.double() @ k.double().transpose(-1, -2) / 32 ** 0.5
    expected = scores.softmax(-1) @ v.double()
    with torch.inference_mode():
        outputs = [layers.attention(q.bfloat16(), k.bfloat16(), v.bfloat16()) for _ in range(4)]
    if fusing:  # oneDNN Graph did take the pattern: the speed comes from this
        assert "oneDNNFusionGroup" in str(torch.jit.last_executed_optimized_graph())
    for out in outputs:
        assert out.dtype == torch.bfloat16 and out.shape == expected.shape
        tolerance = 0.01 if fusing else 0.02  # fp32 inside, bf16 out; else the flash kernel's bf16 scores
        torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=0.01)
        assert torch.equal(out, outputs[0])  # the first call too: TorchScript's profiling run is not returned
    with torch.inference_mode():  # a row's result does not depend on the batch it came in, over many batch sizes
        qb, kb, vb = (torch.randn(24, 4, 37, 32, generator=generator).bfloat16() for _ in range(3))
        whole = layers.attention(qb, kb, vb)
        differ = [n for n in range(1, 24) if not torch.equal(layers.attention(qb[:n], kb[:n], vb[:n]), whole[:n])]
    assert differ == []
    assert (expected.abs() > 0.3).float().mean() > 0.3  # outputs of size, not a near-zero average of v
    torch.testing.assert_close(layers.attention(q, k, v).double(), expected, atol=1e-5, rtol=1e-5)  # fp32: SDPA


def test_cpus_with_amx_keep_the_flash_kernel(monkeypatch):
    from blipsearch.retrieval.models import layers

    monkeypatch.setattr(layers, "_has_amx", lambda: True)
    q, k, v = (torch.randn(2, 3, 19, 16, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(3))
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(layers.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
