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
    """The one-call oneDNN linear+gelu (CPU) against gelu(linear(x)) in float64; the two-call fallback too."""
    from blipsearch.retrieval.models import layers

    generator = torch.Generator().manual_seed(0)
    linear = layers.Linear(48, 96)
    linear.weight.data = torch.randn(96, 48, generator=generator) * 0.2
    linear.bias.data = torch.randn(96, generator=generator) * 0.2
    x = torch.randn(2, 7, 48, generator=generator)
    expected = F.gelu(F.linear(x.double(), linear.weight.double(), linear.bias.double()))
    assert (expected < 0).any() and (expected > 1).any()  # both of gelu's regimes are exercised
    for fused in (True, False):
        monkeypatch.setattr(layers, "_fused_linear_available", lambda fused=fused: fused)
        torch.testing.assert_close(layers.linear_gelu(x, linear).double(), expected, atol=1e-5, rtol=1e-5)
        bf16 = layers.Linear(48, 96).to(torch.bfloat16)
        bf16.weight.data, bf16.bias.data = linear.weight.data.bfloat16(), linear.bias.data.bfloat16()
        out = layers.linear_gelu(x.bfloat16(), bf16)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), expected, atol=0.05, rtol=0.02)  # bf16 inputs: ~3 digits
