"""The accelerator path, against the fp32 computation on the CPU: where `--device auto` puts a model and in
which precision, its scores (live and from stored int8 features, as a query reads them), and a training run
whose export the engine then loads there.

Marked `gpu`: the default selection (pyproject.toml) leaves these out, since CI has no GPU. On a machine with
a CUDA device: `python -m pytest -m gpu tests/test_gpu.py` (benchmarks/gpu_check.sh runs them with the GPU
benchmark). With BLIPSEARCH_GPU_TEST_DEVICE=cpu the same checks run on the CPU in bf16, which checks the
checks themselves on a machine without a GPU.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_scripts import scenes

from blipsearch.indexer import codec
from blipsearch.retrieval.device import select_device, select_dtype
from blipsearch.retrieval.models import load_model

from precision import assert_within_tolerance_and_same_ranking, fused_scores

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("BLIPSEARCH_GPU_TEST_DEVICE", "cuda")
TEXT = "a red circle above a blue square"
TOLERANCE = 0.03  # fused ITM + ITC score in half precision against fp32: as tests/test_models.py's bf16 check
MIN_APART = {"blip": 1, "blip-2": 21}  # pairs fp32 puts 2 x TOLERANCE apart, at least (tests/test_blip2.py)


@pytest.fixture(scope="module")
def accelerator() -> tuple[str, str]:
    """(device, precision) under test: CUDA with `auto` precision; the CPU in bf16 for a dry run. A run that
    selected these checks on a machine without CUDA fails: a GPU check that passes by skipping would say
    nothing."""
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            pytest.fail("no CUDA device here: these checks need one (or BLIPSEARCH_GPU_TEST_DEVICE=cpu)")
        return "auto", "auto"
    return DEVICE, "bf16"


def test_auto_puts_the_model_on_the_accelerator_in_half_precision(accelerator, family_model_dir):
    device, precision = accelerator
    model = load_model(str(family_model_dir), device, precision)
    expected_device = select_device(device)
    assert torch.device(model.device).type == expected_device.type
    if DEVICE == "cuda":
        assert expected_device.type == "cuda"
        assert model.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    else:
        assert model.dtype == torch.bfloat16
    assert model.dtype == select_dtype(expected_device, precision)


def test_scores_stay_within_tolerance_of_fp32_and_keep_the_ranking(accelerator, family_model_dir, family_model):
    device, precision = accelerator
    low = load_model(str(family_model_dir), device, precision)
    assert_within_tolerance_and_same_ranking(family_model, low, TEXT, TOLERANCE,
                                             min_apart=MIN_APART[family_model.info.family])


def test_a_query_over_stored_features_scores_as_fp32_does(accelerator, family_model_dir, family_model):
    """The query path: image features packed to int8 by the indexer (from the accelerator's tensors), read
    back as numpy float32 and re-ranked on the accelerator, against fp32 on the CPU from the same pixels."""
    device, precision = accelerator
    low = load_model(str(family_model_dir), device, precision)
    side = family_model.info.preprocessing.height
    pixels = torch.randn(8, 3, side, side, generator=torch.Generator().manual_seed(5))

    def through_the_store(features: torch.Tensor) -> np.ndarray:
        assert features.device.type == torch.device(low.device).type  # the indexer packs from there
        packed = codec.pack(features)
        return codec.unpack_records([p.record() for p in packed], *features.shape[1:])  # float32, as read

    from_store = fused_scores(low, pixels, TEXT, stored=through_the_store)
    assert from_store.device.type == "cpu"
    reference = fused_scores(family_model, pixels, TEXT)
    assert (from_store - reference).abs().max() < TOLERANCE + 0.02  # + the int8 store's own tolerance


@pytest.fixture(scope="module")
def scene_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu-scenes")
    scenes().write_dataset(root, seed=0, size=64, sizes={"train": 24, "val": 4, "test": 4})
    return root


@pytest.mark.usefixtures("training_threads")
def test_a_training_run_on_the_accelerator_exports_what_the_engine_loads_there(accelerator, scene_data, tmp_path):
    """Three steps of the tiny preset with `device=auto` and autocast: the first step's ITC loss as fp32 on the
    CPU gives it (same seed, same batch; no dropout, whose masks come from each device's own random stream),
    finite losses, and an export that the engine loads on the accelerator and scores as fp32 on the CPU
    does."""
    from blipsearch.training.config import load_config
    from blipsearch.training.loop import train

    device, precision = accelerator
    tiny = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"

    def run(name: str, *overrides: str) -> Path:
        cfg = load_config(tiny, [f"data.train={scene_data / 'train.json'}", f"output={tmp_path / name}",
                                 "log_every=1", "threads=1", "optim.max_steps=3", "model.text_dropout=0.0",
                                 *overrides])
        return train(cfg)

    on_accelerator = run("accelerator", f"device={device}", f"optim.precision={precision}")
    on_cpu = run("cpu", "device=cpu", "optim.precision=fp32")
    logs = [[json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            for out in (on_accelerator, on_cpu)]
    assert all(np.isfinite(entry["loss"]) for entry in logs[0]) and len(logs[0]) == 3
    assert logs[0][0]["itc_loss"] == pytest.approx(logs[1][0]["itc_loss"], rel=0.02)
    exported = on_accelerator / "retrieval"
    low = load_model(str(exported), device, precision)
    assert torch.device(low.device).type == select_device(device).type
    assert_within_tolerance_and_same_ranking(load_model(str(exported), "cpu", "fp32"), low, TEXT, TOLERANCE)
