"""Round trip: train a tiny model a few steps, export, load it as the engine does, index a folder, query."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blipsearch.indexer.images import load_image
from blipsearch.retrieval.models import load_model
from blipsearch.training.checkpoint import LAST, read
from blipsearch.training.config import from_dict
from blipsearch.training.data import normalise
from blipsearch.training.loop import export_checkpoint, prepare_model, train

from test_training_loop import scenes, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    scenes().write_dataset(root / "data", seed=1, size=64, sizes={"train": 24, "val": 4, "test": 4})
    return train(tiny_config(root / "data", root / "run", "optim.max_steps=3"))


def _training_model(run: Path):
    payload = read(run / LAST)
    model, tokenizer = prepare_model(from_dict(payload["config"]), [], run, is_main=False)
    model.load_state_dict(payload["model"])
    return model.eval(), tokenizer


def test_export_loads_in_the_engine_with_the_training_features(trained, tmp_path):
    model, _ = _training_model(trained)
    engine = load_model(str(trained / "retrieval"), device="cpu", precision="fp32")
    assert engine.info.embed_dim == 16 and engine.enc_token_id == model.ids.enc
    image = next((trained.parent / "data" / "images" / "test").glob("*.png"))
    pixels = load_image(image, engine.info.preprocessing).pixels
    encoded = engine.encode_images(engine.pixel_values([pixels]))
    texts = engine.encode_texts(["a red circle left of a blue square", "a small green diamond"])
    with torch.no_grad():
        embeds, image_feat = model.encode_image(normalise(torch.from_numpy(pixels.copy())[None]))
        _, text_feat = model.encode_text(texts.tokens.input_ids, texts.tokens.attention_mask)
        itm = model.itm_logits(texts.tokens.input_ids, texts.tokens.attention_mask, embeds.expand(2, -1, -1))
    torch.testing.assert_close(encoded.embeddings[:, 0], image_feat, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(texts.embeddings, text_feat, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(engine.itm_scores(texts.tokens, encoded.features.expand(2, -1, -1)), itm,
                               atol=1e-5, rtol=1e-4)


def test_export_command_rewrites_the_same_weights(trained, tmp_path):
    from safetensors.torch import load_file

    paths = export_checkpoint(trained / LAST, tmp_path / "again")
    assert [p.name for p in paths] == ["retrieval", "captioner"]
    ours, theirs = load_file(paths[0] / "model.safetensors"), load_file(trained / "retrieval" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_export_of_a_file_that_is_no_checkpoint_is_one_line(tmp_path):
    """Garbage once ended in an UnpicklingError traceback, an empty file in a bare "Aborted!"; a pickle that
    would run code is refused by the weights-only reader."""
    import pickle

    from runner import run_cli

    class Runs:
        def __reduce__(self):
            return (print, ("this ran",))

    (tmp_path / "garbage.pt").write_text("hi")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    (tmp_path / "code.pt").write_bytes(pickle.dumps(Runs()))
    for name, fragment in (("garbage.pt", "it is not a checkpoint that `blipsearch train` wrote, or it is damaged"),
                           ("empty.pt", "it is not a checkpoint that `blipsearch train` wrote, or it is damaged"),
                           ("other.pt", "is not a checkpoint that `blipsearch train` wrote (it lacks"),
                           ("code.pt", "it is not a checkpoint that `blipsearch train` wrote, or it is damaged")):
        done = run_cli("export", str(tmp_path / name), str(tmp_path / "out"), text=True)
        assert done.returncode == 1 and "this ran" not in done.stdout, (name, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("blipsearch: error: ") and fragment in lines[0], lines


def test_exported_captioner_generates(trained):
    from transformers import AutoTokenizer, BlipForConditionalGeneration

    captioner = BlipForConditionalGeneration.from_pretrained(trained / "captioner")
    tokenizer = AutoTokenizer.from_pretrained(trained / "captioner")
    out = captioner.generate(pixel_values=torch.zeros(2, 3, 32, 32), max_length=8)
    assert out.shape[0] == 2 and (out[:, 0] == tokenizer.convert_tokens_to_ids("[DEC]")).all()


def test_blipsearch_index_and_query_with_the_exported_model(trained, tmp_path):
    folder = tmp_path / "photos"
    scenes().write_demo_folder(folder, count=6, seed=3, size=64)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    model = str(trained / "retrieval")
    common = ["--model", model, "--index", str(tmp_path / "index"), "--device", "cpu", "--precision", "fp32"]
    index = subprocess.run([sys.executable, "-m", "blipsearch.retrieval.cli", "index", str(folder), *common, "-q"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert index.returncode == 0, index.stderr
    query = subprocess.run([sys.executable, "-m", "blipsearch.retrieval.cli", "query",
                            "a red circle left of a blue square", *common, "--json"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert query.returncode == 0, query.stderr
    answer = json.loads(query.stdout)
    assert answer["query"] == "a red circle left of a blue square"
    assert sorted(Path(r["path"]).name for r in answer["results"]) == sorted(p.name for p in folder.glob("*.png"))
    scores = [r["score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True)


def test_export_refuses_a_folder_that_holds_a_model_unless_told_to_replace_it(trained, tmp_path):
    """Export once wrote into OUT/retrieval beside whatever lay there (a user's notes, an older model's
    preprocessor_config.json, which a loader may read first), with exit status 0."""
    from runner import run_cli

    out = tmp_path / "out"
    (out / "retrieval").mkdir(parents=True)
    (out / "retrieval" / "notes.txt").write_text("mine")
    refused = run_cli("export", str(trained / LAST), str(out), text=True)
    assert refused.returncode == 1, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert lines == [f"blipsearch: error: output {out} already holds retrieval/; pass --overwrite to replace it, "
                     "or another output folder"]
    assert sorted(p.name for p in out.iterdir()) == ["retrieval"]  # the captioner was not written either,
    assert [p.name for p in (out / "retrieval").iterdir()] == ["notes.txt"]  # and no staging folder stays
    done = run_cli("export", str(trained / LAST), str(out), "--overwrite", text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["captioner", "retrieval"]
    assert not (out / "retrieval" / "notes.txt").exists() and (out / "retrieval" / "model.safetensors").is_file()
    fresh = tmp_path / "fresh"  # an empty retrieval/ holds no model: it is not refused
    (fresh / "retrieval").mkdir(parents=True)
    assert run_cli("export", str(trained / LAST), str(fresh), text=True).returncode == 0


def test_export_of_a_checkpoint_moved_out_of_its_run_names_the_missing_folder(trained, tmp_path):
    """It said "model '.../tokenizer' is neither an existing directory nor a hub id"."""
    import shutil

    from runner import run_cli

    moved = tmp_path / "moved" / LAST
    moved.parent.mkdir()
    shutil.copy(trained / LAST, moved)
    done = run_cli("export", str(moved), str(tmp_path / "out"), text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"blipsearch: error: checkpoint {moved}: the tokenizer/ folder its run saved is not beside it; export it "
        "from its run folder, or copy that folder next to it"]
    shutil.copytree(trained / "tokenizer", moved.parent / "tokenizer")
    assert run_cli("export", str(moved), str(tmp_path / "out"), text=True).returncode == 0
