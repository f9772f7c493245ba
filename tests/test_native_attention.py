"""The bf16 attention kernel built on the machine (`models/native.py`): its results against float64 and
torch's kernels, and every way it steps aside (no compiler, other CPUs, shapes it does not take, a failed
check). The numeric tests need a CPU with AVX512-BF16 and no AMX, where the engine uses the kernel."""

import os
import signal
import subprocess
import tempfile

import pytest
import torch
import torch.nn.functional as F

from blipsearch.retrieval.models import layers, native


def _can_build() -> bool:
    """An x86-64 Linux C compiler that takes the kernel's flags (AVX512-BF16: GCC 10 or later, Clang 9)."""
    compiler = native._compiler()
    if compiler is None or native.platform.system() != "Linux" or native.platform.machine() != "x86_64":
        return False
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "probe.c")
        with open(source, "w") as f:
            f.write("int probe(void) { return 0; }\n")
        return subprocess.run([*compiler, *native.FLAGS, source, "-o", os.path.join(folder, "probe.so")],
                              capture_output=True).returncode == 0


BUILDS = _can_build()
needs_compiler = pytest.mark.skipif(not BUILDS, reason="building it needs an x86-64 Linux C compiler that knows "
                                    "AVX512-BF16")
needs_kernel = pytest.mark.skipif(native._unsupported() is not None or not BUILDS,
                                  reason=f"the kernel does not run here: {native._unsupported() or 'no compiler'}")


def _qkv(batch: int, tokens: int, heads: int, seed: int, peak: float = 1.0):
    """q, k, v as a ViT's qkv projection hands them over: strided (B, heads, T, 64) views of one tensor."""
    qkv = torch.randn(batch, tokens, 3, heads, 64, generator=torch.Generator().manual_seed(seed))
    qkv[:, :, 0] *= peak
    return qkv.bfloat16().permute(2, 0, 3, 1, 4)


def _exact(q, k, v):
    return torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8, dim=-1) @ v.double()


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 2, 15, 16, 17, 37, 65, 577])
def test_kernel_matches_float64_as_closely_as_torchs_bf16_flash_kernel(tokens):
    """Flat and peaked attention (queries x1 and x4), token counts around the kernel's blocks of 16 keys and 6
    rows; its error within 1.5x that of torch's own bf16 kernel, and a few bf16 steps at most."""
    for peak in (1.0, 4.0):
        q, k, v = _qkv(2, tokens, 3, seed=tokens, peak=peak)
        with torch.inference_mode():
            got = native.attention(q, k, v)
            flash = F.scaled_dot_product_attention(q, k, v)
        assert got is not None and got.dtype == torch.bfloat16 and got.shape == q.shape
        exact = _exact(q, k, v)
        error, flash_error = (got.double() - exact).abs().max().item(), (flash.double() - exact).abs().max().item()
        assert error <= 1.5 * flash_error + 1e-3, (peak, error, flash_error)
        torch.testing.assert_close(got.double(), exact, atol=0.02, rtol=0.01)
        assert got.transpose(1, 2).is_contiguous()  # the heads merge without a copy


@needs_kernel
def test_kernel_rows_do_not_depend_on_batch_or_threads():
    """An image's attention is the same bits whatever batch it came in, and however many threads split it."""
    q, k, v = _qkv(5, 37, 4, seed=1)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        try:
            torch.set_num_threads(1)
            alone = [native.attention(q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i in range(5)]
            torch.set_num_threads(2)
            split = native.attention(q, k, v)  # two threads, each a part of the 20 heads
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(torch.cat(alone), split)


@needs_kernel
def test_a_forked_child_splits_heads_over_threads_of_its_own():
    """The parent's pool threads do not exist in a forked child (a Ray worker, a forking server): the child
    makes its own rather than waiting on them for ever."""
    q, k, v = _qkv(2, 37, 3, seed=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            expected = native.attention(q, k, v)  # the parent's pool of two now exists
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the child: one call, its answer down the pipe, then out without the parent's teardown
            code = 1
            try:
                signal.alarm(20)
                with torch.inference_mode():
                    os.write(write, native.attention(q, k, v).contiguous().view(torch.int16).numpy().tobytes())
                code = 0
            finally:
                os._exit(code)  # never back into pytest, whatever happened
    finally:
        torch.set_num_threads(threads)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert answer == expected.contiguous().view(torch.int16).numpy().tobytes()


@needs_kernel
def test_vit_uses_the_kernel_and_stays_near_fp32(monkeypatch):
    """A ViT of 64-wide heads in bf16 goes through the kernel, and its features and embeddings stay within
    bf16's reach of the same tower in fp32."""
    from blipsearch.retrieval.models.blip_vision import BlipVisionTower, VisionTowerConfig

    config = VisionTowerConfig(image_size=32, patch_size=8, hidden_size=128, num_layers=2, num_heads=2,
                               intermediate_size=256, embed_dim=32)
    generator = torch.Generator().manual_seed(0)
    tower = BlipVisionTower(config)
    for name, tensor in tower.state_dict().items():
        tensor.copy_(torch.ones_like(tensor) if name.endswith("norm1.weight") or name.endswith("norm2.weight")
                     or name.endswith("layernorm.weight") else torch.randn(tensor.shape, generator=generator) * 0.1)
    calls = []
    real = native.attention
    monkeypatch.setattr(native, "attention", lambda *a: calls.append(out := real(*a)) or out)
    pixels = torch.randn(3, 3, 32, 32, generator=generator)
    with torch.inference_mode():
        features32, embeddings32 = tower(pixels)
        features, embeddings = tower.to(torch.bfloat16)(pixels.bfloat16())
    assert len(calls) == 2 and all(c is not None for c in calls)  # both layers, through the kernel
    torch.testing.assert_close(features.float(), features32, atol=0.1, rtol=0.05)
    assert F.cosine_similarity(embeddings, embeddings32).min() > 0.999
    assert features32.std(dim=0).mean() > 0.1  # images differ: the comparison has teeth


def test_kernel_steps_aside_for_shapes_and_layouts_it_does_not_take():
    q, k, v = _qkv(2, 9, 2, seed=2)
    assert native.attention(q.float(), k.float(), v.float()) is None  # fp32
    narrow = torch.randn(2, 2, 9, 88).bfloat16()  # BLIP-2's ViT-g heads
    assert native.attention(narrow, narrow, narrow) is None
    odd = torch.randn(2, 2, 9, 65).bfloat16()[..., 1:]  # rows starting at odd elements
    assert native.attention(odd, odd, odd) is None
    assert native.attention(q, k[:, :, :5], v[:, :, :5]) is None  # not a self-attention
    with torch.inference_mode():  # layers.attention computes all of them anyway
        for shape in [(2, 2, 9, 88), (2, 2, 9, 64)]:
            x = torch.randn(*shape).bfloat16()
            torch.testing.assert_close(layers.attention(x, x, x).double(), _exact_any(x), atol=0.02, rtol=0.01)


def _exact_any(x):
    return torch.softmax(x.double() @ x.double().transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1) @ x.double()


@pytest.fixture
def fresh_kernel():
    """The process's kernel is looked up again inside the test and after it (it is cached once per process)."""
    native._built_kernel.cache_clear()
    yield
    native._built_kernel.cache_clear()


@pytest.mark.parametrize("off", ["no compiler", "BLIPSEARCH_NATIVE=0"])
def test_without_the_kernel_attention_falls_back_to_torch(off, monkeypatch, fresh_kernel):
    if off == "no compiler":
        monkeypatch.setattr(native, "_compiler", lambda: None)
    else:
        monkeypatch.setenv("BLIPSEARCH_NATIVE", "0")
    assert native._built_kernel() is None
    q, k, v = _qkv(1, 17, 2, seed=3)
    with torch.inference_mode():
        assert native.attention(q, k, v) is None
        torch.testing.assert_close(layers.attention(q, k, v).double(), _exact(q, k, v), atol=0.02, rtol=0.01)


@needs_kernel
def test_a_damaged_cached_build_is_built_again(tmp_path, monkeypatch, fresh_kernel):
    monkeypatch.setattr(native, "_folders", lambda: [tmp_path])
    built = native._build()
    built.write_bytes(b"not a shared library")  # a damaged file where the build was
    assert native._built_kernel() is not None
    assert built.read_bytes()[:4] == b"\x7fELF"


@needs_compiler
def test_build_goes_to_the_first_writable_cache_folder_and_is_reused(tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder would be")
    monkeypatch.setattr(native, "_folders", lambda: [blocked / "kernels", tmp_path / "cache"])
    built = native._build()
    assert built.parent == tmp_path / "cache" and built.suffix == ".so"
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no partial file left behind
    stamp = built.stat().st_mtime_ns
    assert native._build() == built and built.stat().st_mtime_ns == stamp  # built once

    assert callable(native._load(built))  # a library that loads, with the kernel's symbol

def test_a_private_temporary_folder_is_made_only_where_the_cache_cannot_be_written(tmp_path, monkeypatch):
    import platformdirs

    made = []
    monkeypatch.setattr(native, "_private_folder", lambda: made.append(1) or tmp_path)
    monkeypatch.setattr(platformdirs, "user_cache_path", lambda name: tmp_path / "cache")
    assert next(iter(native._folders())) == tmp_path / "cache/kernels" and made == []


@needs_kernel
def test_a_kernel_that_fails_its_check_is_not_used(monkeypatch, fresh_kernel):
    """A broken build (here: one that leaves its output unwritten) is caught before any use."""
    def broken(*args):
        return 0  # writes nothing: the output keeps its zeros
    monkeypatch.setattr(native, "_load", lambda path: broken)
    monkeypatch.setattr(native, "_output", lambda *shape: torch.zeros(*shape, dtype=torch.bfloat16))
    assert native._built_kernel() is None
