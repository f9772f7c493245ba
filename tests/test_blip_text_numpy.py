"""The numpy text side (models/blip_text_numpy.py, blip_numpy.py) against the torch tower in fp32, and the
rule that sends a text query to it (device.numpy_text_side), so that such a query never imports torch."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blipsearch.retrieval import device as device_module
from blipsearch.retrieval.api import Index
from blipsearch.retrieval.device import cpu_has_fast_bf16, numpy_text_side
from blipsearch.retrieval.errors import ModelLoadError
from blipsearch.retrieval.models import load_model
from blipsearch.retrieval.models.blip import BlipRetrievalModel
from blipsearch.retrieval.models.blip_numpy import BlipNumpyTextModel
from blipsearch.retrieval.models.blip_text import BlipTextTower
from blipsearch.retrieval.models.blip_text_numpy import NumpyTextTower, _gelu
from blipsearch.retrieval.models.loading import read_arrays
from blipsearch.retrieval.models.text_config import TextTowerConfig
from blipsearch.retrieval.search import SearchOptions

from runner import blipsearch, photo_library

TEXTS = ["a red dog on the beach", "a cat", "a photo of a blue car in the sea"]  # unequal lengths: padding
TOLERANCE = 1e-5  # fp32 against fp32: both sum the same products in different orders


@pytest.fixture(scope="module")
def towers():
    """A random tower of uneven sizes (heads of 16, image tokens wider than the text) in both runtimes."""
    config = TextTowerConfig(vocab_size=90, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96,
                             max_positions=40, image_hidden_size=48, embed_dim=24)
    torch_tower = BlipTextTower(config).eval()
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in torch_tower.state_dict().items()}
    torch_tower.load_weights(state)
    return torch_tower, NumpyTextTower(config, {k: v.numpy() for k, v in state.items()})


def _tokens(rows: int, length: int, seed: int, pad_from: dict[int, int] | None = None):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    for row, start in (pad_from or {}).items():
        mask[row, start:] = 0
    return ids, mask


def test_text_embeddings_equal_the_torch_tower_with_padding(towers):
    torch_tower, numpy_tower = towers
    ids, mask = _tokens(4, 9, seed=1, pad_from={1: 4, 3: 2})
    with torch.no_grad():
        expected = torch_tower.embed_texts(ids, mask).numpy()
    got = numpy_tower.embed_texts(ids.numpy(), mask.numpy())
    assert got.dtype == np.float32 and got.shape == (4, 24)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=TOLERANCE)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)


@pytest.mark.parametrize(("texts", "images"), [(1, 5), (5, 5), (1, 1)])
def test_itm_logits_equal_the_torch_tower(towers, texts, images):
    """One text against every image (the query's case), text i against image i, and one pair (several images
    are split over the cores, one alone is not)."""
    torch_tower, numpy_tower = towers
    ids, mask = _tokens(texts, 8, seed=2, pad_from={3: 5} if texts > 1 else None)
    image = torch.randn(images, 13, 48, generator=torch.Generator().manual_seed(3)) * 2
    with torch.no_grad():
        expected = torch_tower.itm_logits(ids.expand(images, -1), mask.expand(images, -1), image).numpy()
    got = numpy_tower.itm_logits(ids.numpy(), mask.numpy(), image.numpy())
    assert got.shape == (images, 2)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=TOLERANCE)
    if images > 1:
        assert expected[:, 1].std() > 0.05  # the logits differ across images: the comparison has teeth


def test_a_split_pass_leaves_the_blas_threads_as_they_were(towers):
    from threadpoolctl import threadpool_info

    _, numpy_tower = towers
    before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    ids, mask = _tokens(1, 6, seed=6)
    numpy_tower.itm_logits(ids.numpy(), mask.numpy(), np.ones((4, 7, 48), np.float32))
    assert [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] == before


def test_one_image_against_many_texts_equals_repeating_it(towers):
    torch_tower, numpy_tower = towers
    ids, mask = _tokens(4, 7, seed=7, pad_from={2: 3})
    image = torch.randn(1, 11, 48, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = torch_tower.itm_logits(ids, mask, image.expand(4, -1, -1)).numpy()
    got = numpy_tower.itm_logits(ids.numpy(), mask.numpy(), image.numpy())
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_a_forked_child_runs_split_passes_of_its_own(towers):
    """The pool of the parent's threads does not exist in a forked child: the child makes its own."""
    _, numpy_tower = towers
    ids, mask = _tokens(1, 6, seed=9)
    image = np.random.default_rng(10).standard_normal((4, 7, 48)).astype(np.float32)
    expected = numpy_tower.itm_logits(ids.numpy(), mask.numpy(), image)  # the parent's pool now exists
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: one pass, its answer down the pipe, then out without the parent's teardown
        signal.alarm(20)
        os.write(write, numpy_tower.itm_logits(ids.numpy(), mask.numpy(), image).tobytes())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    np.testing.assert_array_equal(np.frombuffer(answer, np.float32).reshape(4, 2), expected)


def test_itm_refuses_features_of_another_width_or_count(towers):
    _, numpy_tower = towers
    ids, mask = _tokens(2, 6, seed=4)
    with pytest.raises(ValueError, match="expected"):
        numpy_tower.itm_logits(ids.numpy(), mask.numpy(), np.zeros((2, 5, 40), np.float32))
    with pytest.raises(ValueError, match="2 texts for 3 images"):
        numpy_tower.itm_logits(ids.numpy(), mask.numpy(), np.zeros((3, 5, 48), np.float32))


def test_gelu_is_the_exact_erf_gelu():
    x = np.linspace(-9, 9, 20001, dtype=np.float32)
    got = x.copy()
    _gelu(got)
    expected = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float64))).numpy()  # erf, float64
    np.testing.assert_allclose(got, expected, atol=5e-7, rtol=0)


def test_a_text_only_fp32_load_is_the_numpy_side_and_scores_as_torch_does(tiny_model_dir, tiny_model):
    light = load_model(str(tiny_model_dir), "cpu", "fp32", with_vision=False)
    assert isinstance(light, BlipNumpyTextModel)
    assert isinstance(tiny_model, BlipRetrievalModel)  # with vision: torch
    assert isinstance(load_model(str(tiny_model_dir), torch.device("cpu"), "fp32", with_vision=False),
                      BlipRetrievalModel)  # a torch.device asks for torch
    assert light.info == tiny_model.info  # the index's check of the model passes either way
    ours, theirs = light.encode_texts(TEXTS), tiny_model.encode_texts(TEXTS)
    np.testing.assert_array_equal(ours.tokens.input_ids, theirs.tokens.input_ids.numpy())
    np.testing.assert_allclose(ours.embeddings, theirs.embeddings.numpy(), atol=TOLERANCE, rtol=TOLERANCE)
    features = np.random.default_rng(5).standard_normal((4, 17, 32)).astype(np.float32) * 2
    one = light.tokenize(TEXTS[:1])
    np.testing.assert_allclose(light.itm_scores(one, features),
                               tiny_model.itm_scores(tiny_model.tokenize(TEXTS[:1]), features).numpy(),
                               atol=TOLERANCE, rtol=TOLERANCE)
    assert one.input_ids[0, 0] != light.enc_token_id  # [ENC] goes into a copy; the caller's tokens keep [CLS]
    with pytest.raises(ModelLoadError, match="without its vision tower"):
        light.encode_images(None)


def test_blip2_and_other_precisions_keep_torch(tiny_blip2_dir, tiny_model_dir):
    assert not isinstance(load_model(str(tiny_blip2_dir), "cpu", "fp32", with_vision=False), BlipNumpyTextModel)
    assert not isinstance(load_model(str(tiny_model_dir), "cpu", "bf16", with_vision=False), BlipNumpyTextModel)


def test_the_rule_needs_fp32_on_the_cpu(monkeypatch):
    assert numpy_text_side("cpu", "fp32")
    assert not numpy_text_side("cuda", "fp32") and not numpy_text_side("mps", "auto")
    assert not numpy_text_side("cpu", "bf16") and not numpy_text_side("cpu", "fp16")
    assert not numpy_text_side("gpu", "fp32") and not numpy_text_side("cpu", "fp64")  # torch names the error
    # auto precision: what torch would pick, from /proc/cpuinfo before torch is imported
    assert numpy_text_side("cpu", "auto") == (not cpu_has_fast_bf16())
    monkeypatch.setattr(device_module, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh query process (restored after the test)
    assert not numpy_text_side("cpu", "auto")
    # a process that answers once and exits: fp32 numpy starts faster than torch's bf16 computes
    assert numpy_text_side("cpu", "auto", one_shot=True)
    assert not numpy_text_side("cpu", "bf16", one_shot=True) and not numpy_text_side("cuda", "auto", one_shot=True)
    monkeypatch.setattr(device_module, "_cpu_flags", lambda: {"avx2", "fma"})
    assert numpy_text_side("cpu", "auto")
    monkeypatch.setattr(device_module, "_cpu_flags", lambda: None)  # unknown: torch decides
    assert not numpy_text_side("cpu", "auto") and not numpy_text_side("cpu", "auto", one_shot=True)


def test_a_one_shot_text_search_on_a_cpu_with_bf16_units_runs_numpy_and_others_keep_torchs_bf16(
        library, monkeypatch):
    """This CPU's flags patched to bf16 units: `Index.open(one_shot=True)`, as `blipsearch query` opens it (in
    process here), loads the numpy side; without one_shot the library keeps torch in bf16."""
    monkeypatch.setattr(device_module, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(device_module, "_ACCELERATOR_FILES", ())  # device auto: the CPU, whatever this machine has
    one_shot = Index.open(library / "index", with_vision=False, one_shot=True)
    assert isinstance(one_shot.model, BlipNumpyTextModel)
    kept = Index.open(library / "index", device="cpu", with_vision=False)
    assert isinstance(kept.model, BlipRetrievalModel) and kept.model.dtype == torch.bfloat16
    loaded = []
    monkeypatch.setattr(BlipNumpyTextModel, "load", lambda checkpoint, load=BlipNumpyTextModel.load:
                        loaded.append(checkpoint) or load(checkpoint))
    blipsearch("query", "a red dog", "--json", index=library / "index")
    assert len(loaded) == 1


def test_weights_stored_in_half_precisions_read_as_float32(tmp_path):
    from safetensors.torch import save_file

    tensors = {"text_proj.weight": torch.randn(3, 4), "text_proj.bias": torch.randn(3)}
    save_file({"text_proj.weight": tensors["text_proj.weight"].bfloat16(),
               "text_proj.bias": tensors["text_proj.bias"].half(), "vision_proj.weight": torch.randn(2)},
              str(tmp_path / "model.safetensors"))
    arrays = read_arrays(tmp_path, "m", ("text_",))
    assert set(arrays) == {"text_proj.weight", "text_proj.bias"}
    np.testing.assert_array_equal(arrays["text_proj.weight"], tensors["text_proj.weight"].bfloat16().float().numpy())
    np.testing.assert_array_equal(arrays["text_proj.bias"], tensors["text_proj.bias"].half().float().numpy())
    assert all(a.dtype == np.float32 for a in arrays.values())
    save_file({"text_proj.weight": tensors["text_proj.weight"],
               "text_encoder.embeddings.position_ids": torch.arange(5)[None]},  # an older export's int64 buffer
              str(tmp_path / "model.safetensors"))
    assert set(read_arrays(tmp_path, "m", ("text_",))) == {"text_proj.weight"}  # skipped: no weight
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-20])
    with pytest.raises(ModelLoadError, match="cannot read the weights file"):
        read_arrays(tmp_path, "m", ("text_",))


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model_dir):
    return photo_library(tmp_path_factory.mktemp("numpy-query"), tiny_model_dir, {"a": 6, "b": 5})


def test_searches_answer_as_the_torch_model_does(library):
    light = Index.open(library / "index", device="cpu", precision="fp32", with_vision=False)
    full = Index.open(library / "index", device="cpu", precision="fp32")
    assert isinstance(light.model, BlipNumpyTextModel) and isinstance(full.model, BlipRetrievalModel)
    for query in TEXTS:
        ours, theirs = (i.search(query, SearchOptions(top=11, candidates=11)) for i in (light, full))
        assert [r.path for r in ours] == [r.path for r in theirs]
        np.testing.assert_allclose([r.score for r in ours], [r.score for r in theirs], atol=1e-5)
        np.testing.assert_allclose([r.itm_prob for r in ours], [r.itm_prob for r in theirs], atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_a_text_query_process_imports_torch_only_where_it_computes_otherwise(library, precision):
    """The `blipsearch query` command in a fresh process: with fp32 (on the CPU: `--device cpu` where this
    machine has accelerator files) torch is never imported; with auto precision, on any x86 CPU with AVX2
    (bf16 units or not: the command answers once, and numpy's fp32 starts faster), else where this CPU has no
    bf16 units (read from /proc/cpuinfo in that process). Either way it answers, and FAISS is not imported for
    an index of the exact tier (its vectors are scanned with numpy)."""
    device = ["--device", "cpu"] if any(Path(p).exists() for p in device_module._ACCELERATOR_FILES) else []
    script = (
        "import sys\n"
        "from blipsearch.retrieval.cli import main\n"
        "main(sys.argv[1:], standalone_mode=False)\n"
        "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n"
        "print('faiss imported:', 'faiss' in sys.modules, file=sys.stderr)\n"
    )
    command = ["query", "a red dog", "--index", str(library / "index"), "--json", "--precision", precision, *device]
    done = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.splitlines()[0])
    assert len(answer["results"]) == 10 and all(r["itm_prob"] is not None for r in answer["results"])
    numpy_side = precision == "fp32" or "avx2" in (device_module._cpu_flags() or ()) or not cpu_has_fast_bf16()
    assert f"torch imported: {not numpy_side}" in done.stderr, done.stderr
    assert "faiss imported: False" in done.stderr, done.stderr


@pytest.mark.parametrize(("length", "threads"), [(3, 1), (8, 2)])
def test_the_query_benchmarks_flop_count_is_what_the_numpy_side_multiplies(towers, monkeypatch, length, threads):
    """benchmarks/bench_query.py counts the numpy side's FLOPs with `itm_gflops(first_layer_runs=threads)`:
    every product it runs, counted here as it runs (the linear layers and np.matmul; the ITM head left out),
    in one thread and split over two."""
    from benchmark_scripts import script

    from blipsearch.retrieval.models import blip_text_numpy

    _, tower = towers
    counted = []  # appended from the pass's worker threads
    linear, matmul = blip_text_numpy._linear, np.matmul

    def counting_linear(x, weight, bias):
        counted.append(2 * x.shape[0] * weight.shape[0] * weight.shape[1])
        return linear(x, weight, bias)

    def counting_matmul(a, b, *args, **kwargs):
        out = matmul(a, b, *args, **kwargs)
        counted.append(2 * out.size * a.shape[-1])
        return out

    monkeypatch.setattr(blip_text_numpy, "_cores", lambda: threads)
    monkeypatch.setattr(blip_text_numpy, "_linear", counting_linear)
    monkeypatch.setattr(blip_text_numpy.np, "matmul", counting_matmul)
    ids, mask = _tokens(1, length, seed=4)
    image = np.random.default_rng(0).standard_normal((5, 17, 48), dtype=np.float32)
    try:
        tower.itm_logits(ids.numpy(), mask.numpy(), image)
        assert blip_text_numpy.threads_for(5) == threads
    finally:
        monkeypatch.undo()
        blip_text_numpy._pool.cache_clear()  # a pool made here was sized by the patched core count
    head = 5 * 2 * tower.config.hidden_size * 2
    expected = script("bench_query").itm_gflops(tower.config, length, 17, 5, first_layer_runs=threads) * 1e9
    assert sum(counted) == pytest.approx(expected + head, rel=1e-9)
