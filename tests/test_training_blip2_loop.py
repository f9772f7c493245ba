"""BLIP-2 stage 1 through the loop and `blipsearch train`: the tiny config's loss falls, a resumed run
continues exactly, and the run's export loads in the engine (and again from the checkpoint)."""

import json
from pathlib import Path

import pytest
import torch
from resume import assert_resume_is_exact

from blipsearch.training.config import load_config
from blipsearch.training.loop import run_steps, setup, wrap

from test_training_loop import scenes

pytestmark = pytest.mark.usefixtures("training_threads")  # its runs' configs set threads=1

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "training" / "configs" / "blip2-tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """24 training scenes (120 pairs), 32 px."""
    root = tmp_path_factory.mktemp("blip2-scenes")
    scenes().write_dataset(root, seed=2, size=32, sizes={"train": 24})
    return root / "train.json"


def tiny_config(data: Path, output: Path, *overrides: str):
    return load_config(TINY, [f"data.train={data}", f"output={output}", "log_every=1", "threads=1", *overrides])


def test_tiny_run_loss_falls_on_a_blip_vit(data, tmp_path, tiny_model_dir):
    cfg = tiny_config(data, tmp_path / "run", f"model.vision_from={tiny_model_dir}", "optim.max_steps=20",
                      "optim.lr=1e-2", "save_every=1000")
    run = setup(cfg)
    frozen = {n: p.clone() for n, p in run.model.vision_model.named_parameters()}
    entries = run_steps(run, wrap(run))
    losses = [e["loss"] for e in entries]
    assert len(losses) == 20 and {"itc_loss", "itm_loss", "itg_loss", "temp"} <= set(entries[-1])
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
    assert all(torch.equal(p, frozen[n]) for n, p in run.model.vision_model.named_parameters())


def test_resume_gives_the_same_next_losses(data, tmp_path):
    args = ("optim.max_steps=4", "save_every=2")  # dropout on (0.1): its random state must resume too
    assert_resume_is_exact(lambda name: tiny_config(data, tmp_path / name, *args),
                           ("itc_loss", "itm_loss", "itg_loss"))


def test_blipsearch_train_exports_a_model_the_engine_loads(data, tmp_path, tiny_blip2_dir):
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from blipsearch.retrieval.models import load_model
    from blipsearch.training.cli import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(TINY), "--set", f"data.train={data}", "--set", "optim.max_steps=2",
                                      "--set", f"model.vision_from={tiny_blip2_dir}", "--set", "threads=1",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert f"retrieval model: {out / 'retrieval'}" in result.output
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2]
    assert not (out / "captioner").exists()  # stage 1's ITG head has no transformers class to export to
    engine = load_model(str(out / "retrieval"), device="cpu", precision="fp32")
    assert (engine.info.family, engine.info.vectors_per_image, engine.info.feature_tokens) == ("blip-2", 8, 17)
    again = CliRunner().invoke(cli, ["export", str(out / "checkpoint-last.pt"), str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    ours, theirs = (load_file(d / "retrieval" / "model.safetensors") for d in (tmp_path / "again", out))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
