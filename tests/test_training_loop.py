"""The loop on the tiny preset: configs, the loss falls, resume equals an uninterrupted run, export."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from benchmark_scripts import scenes

from blipsearch.retrieval.errors import InvalidInputError
from blipsearch.training.config import load_config
from blipsearch.training.loop import run_steps, setup, train, wrap

pytestmark = pytest.mark.usefixtures("training_threads")  # its runs' configs set threads=1

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "training" / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def scene_data(tmp_path_factory) -> Path:
    """A small scene dataset: 40 training images (200 pairs), 8 val, 12 test."""
    root = tmp_path_factory.mktemp("scenes")
    scenes().write_dataset(root, seed=0, size=64, sizes={"train": 40, "val": 8, "test": 12})
    return root


def tiny_config(data: Path, output: Path, *overrides: str):
    return load_config(TINY, [f"data.train={data / 'train.json'}", f"output={output}", "log_every=1",
                              "threads=1", *overrides])


def test_presets_and_overrides(tmp_path):
    cfg = load_config(TINY, ["model.text_layers=3", "optim.lr=0.01", "data.crop_scale=[0.5, 1.0]"])
    assert (cfg.model.image_size, cfg.model.text_layers, cfg.optim.lr) == (32, 3, 0.01)
    assert cfg.data.crop_scale == (0.5, 1.0)
    assert load_config(None, ["model.preset=vit-b"]).model.vision_width == 768
    with pytest.raises(InvalidInputError, match="unknown optim key"):
        load_config(TINY, ["optim.learning_rate=1"])
    with pytest.raises(InvalidInputError, match="preset"):
        load_config(None, ["model.preset=huge"])
    with pytest.raises(InvalidInputError, match="losses"):
        load_config(None, ["objective.losses={mlm: 1.0}"])


@pytest.mark.parametrize("override, message", [
    ("optim.max_steps=abc", "optim.max_steps must be a whole number (or null), not 'abc'"),
    ("data.batch_size=big", "data.batch_size must be a whole number, not 'big'"),
    ("optim.max_steps=[1, 2]", "optim.max_steps must be a whole number (or null), not (1, 2)"),
    ("optim.max_steps=-5", "optim.max_steps must be at least 1"),
    ("optim.max_steps=0", "optim.max_steps must be at least 1"),
    ("data.batch_size=true", "data.batch_size must be a whole number, not True"),
    ("save_every=0", "save_every and log_every must be at least 1"),
    # a list, a mapping or a range: TypeErrors, AttributeErrors and torch's RuntimeError from inside the run
    ("data.crop_scale=0.5", "data.crop_scale must be a list of 2 numbers, not 0.5"),
    ("optim.betas=[0.9, a]", "optim.betas must be a number, not 'a'"),
    ("optim.betas=[0.9]", "optim.betas must be a list of 2 numbers, not (0.9,)"),
    ("data.mixture=[a.json, b.json]", "data.mixture must map names to numbers (or null) ({name: 1.0, ...})"),
    ("objective.losses=itc", "objective.losses must map names to numbers ({name: 1.0, ...}), not 'itc'"),
    ("data.caption_instructions=x", "data.caption_instructions must be a list of any number of strings, not 'x'"),
    ("objective.queue_size=-5", "objective.queue_size and data.workers must be at least 0"),
    ("data.workers=-1", "objective.queue_size and data.workers must be at least 0"),
    # sections that are no mappings, and values of the right kind out of range: tracebacks, or accepted
    ("model=5", "model must be a mapping of keys (key: value, ...), not 5"),
    ("data=[1]", "data must be a mapping of keys"),
    ("model.preset=[tiny]", "model.preset must be one of"),
    ("data.train.x=1", "override 'data.train.x=1': data.train is a value, not a section with keys"),
    ("objective.label_smoothing=2", "objective.label_smoothing must be in [0, 1)"),
    ("objective.temperature=-0.5", "objective.temperature must be in [0.001, 0.5]"),
    ("objective.momentum=-1", "objective.momentum must be in [0, 1]"),
    ("objective.alpha=5", "objective.alpha must be in [0, 1]"),
    ("model.text_heads=3", "must be positive multiples of model.text_heads"),
    ("model.embed_dim=-4", "model.embed_dim must be at least 1"),
    ("model.max_text_tokens=1", "model.max_text_tokens at least 2"),
    ("model.max_positions=4", "model.max_positions must exceed model.max_text_tokens"),
    ("data.crop_scale=[-1, 2]", "data.crop_scale must be [low, high] with 0 < low <= high <= 1"),
    ("data.crop_scale=[0.9, 0.1]", "data.crop_scale must be [low, high]"),
    ("optim.clip_grad=-1", "optim.clip_grad must be positive"),
    ("threads=-2", "threads must be at least 1"),
])
def test_config_values_of_the_wrong_kind_are_one_line(override, message):
    """They once ended in a TypeError from deep inside the run, or (negative steps) exported the untrained
    model with exit status 0."""
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        load_config(TINY, [override])
    assert load_config(TINY, ["objective.caption_prompt="]).objective.caption_prompt == ""


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"output: caf\xe9\n")
    with pytest.raises(InvalidInputError, match=r"c.yaml is not UTF-8 text \(byte 12\); save it as UTF-8"):
        load_config(tmp_path / "c.yaml")


def test_a_fresh_run_refuses_an_output_folder_that_holds_a_run(scene_data, tmp_path):
    """It replaced the finished run's last checkpoint, config and exports, and appended to its log."""
    train(tiny_config(scene_data, tmp_path / "run", "optim.max_steps=1"))
    before = (tmp_path / "run" / "checkpoint-last.pt").read_bytes()
    with pytest.raises(InvalidInputError, match=r"already holds a training run \(checkpoint-last.pt, config.json, "
                                                r"log.jsonl\); pass --resume auto"):
        train(tiny_config(scene_data, tmp_path / "run", "optim.max_steps=1"))
    assert (tmp_path / "run" / "checkpoint-last.pt").read_bytes() == before
    (tmp_path / "failed").mkdir()  # a run that stopped before its first checkpoint: nothing to continue
    (tmp_path / "failed" / "config.json").write_text("{}")
    with pytest.raises(InvalidInputError, match=r"holds a training run that saved no checkpoint \(config.json\); "
                                                r"pass --resume auto to start it again there"):
        train(tiny_config(scene_data, tmp_path / "failed", "optim.max_steps=1"))
    (tmp_path / "failed" / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    train(tiny_config(scene_data, tmp_path / "failed", "optim.max_steps=1"), resume="auto")
    logged = (tmp_path / "failed" / "log.jsonl").read_text().splitlines()
    assert len(logged) == 1 and '"loss": 9.0' not in logged[0]  # started again: the old run's line went
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InvalidInputError, match="is a file; name a folder for the run"):
        train(tiny_config(scene_data, tmp_path / "afile", "optim.max_steps=1"))


def test_shipped_configs_load():
    for path in (ROOT / "training" / "configs").glob("*.yaml"):
        load_config(path)


def test_tiny_run_loss_falls(scene_data, tmp_path):
    cfg = tiny_config(scene_data, tmp_path / "run", "optim.max_steps=15", "optim.lr=2e-3", "save_every=1000")
    run = setup(cfg)
    entries = run_steps(run, wrap(run))
    losses = [e["loss"] for e in entries]
    assert len(losses) == 15
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
    assert {"itc_loss", "itm_loss", "lm_loss", "lr", "temp"} <= set(entries[-1])


def test_resume_gives_the_same_next_losses(scene_data, tmp_path):
    args = ("optim.max_steps=6", "save_every=3")
    straight = tiny_config(scene_data, tmp_path / "straight", *args)
    run = setup(straight)
    uninterrupted = run_steps(run, wrap(run))

    interrupted = tiny_config(scene_data, tmp_path / "resumed", *args)
    first = setup(interrupted)
    run_steps(first, wrap(first), until=3)  # stops after the step-3 checkpoint, like a killed run
    resumed = setup(interrupted, resume="auto")
    assert resumed.state.step == 3
    after = run_steps(resumed, wrap(resumed))
    for a, b in zip(uninterrupted[3:], after, strict=True):
        assert a["step"] == b["step"]
        for name in ("itc_loss", "itm_loss", "lm_loss"):
            assert a[name] == pytest.approx(b[name], abs=1e-5), (a, b)


def test_a_resumed_run_keeps_its_vocabulary_when_the_captions_changed(scene_data, tmp_path, caplog):
    """The word-level vocabulary was built again from the data at each start and written over the run's: with
    a word renamed, the checkpoint's rows silently meant other words; with a word added, the resume failed and
    the run's checkpoint could no longer be exported."""
    import shutil

    from blipsearch.training.loop import export_checkpoint

    cfg = tiny_config(scene_data, tmp_path / "run", "optim.max_steps=2", "save_every=2")
    run_steps(first := setup(cfg), wrap(first))
    vocabulary = (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_bytes()
    changed = scene_data / "train-renamed-words.json"  # beside the images it names
    entries = json.loads((scene_data / "train.json").read_text())
    changed.write_text(json.dumps([{**e, "caption": f"zebra {e['caption']}".replace("circle", "aaacircle")}
                                   for e in entries]))
    for output in ("elsewhere", "run"):  # resumed from its checkpoint into another folder, or in its own
        resumed_cfg = tiny_config(scene_data, tmp_path / output, "optim.max_steps=3", f"data.train={changed}")
        resumed = setup(resumed_cfg, resume=str(tmp_path / "run" / "checkpoint-last.pt"))
        assert resumed.tokenizer.convert_tokens_to_ids("circle") == first.tokenizer.convert_tokens_to_ids("circle")
        run_steps(resumed, wrap(resumed))
        assert (tmp_path / output / "tokenizer" / "tokenizer.json").read_bytes() == vocabulary
        assert export_checkpoint(tmp_path / output / "checkpoint-last.pt", tmp_path / f"export-{output}")
    assert "2 words of the training texts are not in the run's vocabulary (e.g. aaacircle, zebra)" in caplog.text
    # a checkpoint copied aside (no vocabulary beside it) resumes with the output folder's
    shutil.copy(tmp_path / "run" / "checkpoint-last.pt", tmp_path / "aside.pt")
    aside = setup(tiny_config(scene_data, tmp_path / "run", "optim.max_steps=4", f"data.train={changed}"),
                  resume=str(tmp_path / "aside.pt"))
    assert len(aside.tokenizer) == len(first.tokenizer)
    # a checkpoint refused (another configuration, another vocabulary) leaves the run's vocabulary alone
    other = tiny_config(scene_data, tmp_path / "other", "model.text_layers=3", "optim.max_steps=1", "save_every=1",
                        f"data.train={changed}")
    run_steps(third := setup(other), wrap(third))
    with pytest.raises(InvalidInputError, match=r"was trained with other values of model.text_layers"):
        setup(tiny_config(scene_data, tmp_path / "run"), resume=str(tmp_path / "other" / "checkpoint-last.pt"))
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_bytes() == vocabulary


def test_a_checkpoint_of_another_configuration_is_refused_in_one_line(scene_data, tmp_path):
    """load_state_dict's RuntimeError (missing, unexpected, other-shaped tensors) was a traceback."""
    other = tiny_config(scene_data, tmp_path / "other", "model.text_layers=3", "optim.max_steps=1", "save_every=1")
    run_steps(first := setup(other), wrap(first))
    torch.save({"model": {}, "config": {}, "state": {}}, tmp_path / "empty.pt")
    for foreign, message in ((tmp_path / "other" / "checkpoint-last.pt", "was trained with other values of "
                              "model.text_layers; resume with the values it was trained with"),
                             (tmp_path / "empty.pt", "does not fit this run's model")):
        with pytest.raises(InvalidInputError, match=re.escape(f"checkpoint {foreign} {message}")):
            setup(tiny_config(scene_data, tmp_path / "run"), resume=str(foreign))


def test_a_resumed_run_applies_a_changed_rate_and_refuses_a_changed_batch(scene_data, tmp_path, caplog):
    """A changed optim.lr was ignored on resume (the optimizer's saved rate won) while config.json recorded it;
    a changed batch size or seed was taken without a word."""
    import json

    args = ("optim.max_steps=4", "save_every=2", "optim.lr=1e-3", "optim.warmup_steps=2")
    first = setup(tiny_config(scene_data, tmp_path / "run", *args))
    run_steps(first, wrap(first), until=2)
    for change in ("data.batch_size=4", "seed=3", "objective.temperature=0.05"):
        with pytest.raises(InvalidInputError, match=f"trained with other values of {change.split('=')[0]}; resume"):
            setup(tiny_config(scene_data, tmp_path / "run", *args, change), resume="auto")
    from blipsearch.training.checkpoint import _changed

    assert _changed({"objective": {"alpha": 1, "new": 2}}, {"objective": {"alpha": 1.0}, "seed": 0}) == []  # values
    assert _changed({"optim": {"betas": [0.9, 0.99]}}, {"optim": {"betas": (0.9, 0.999)}}) == ["optim.betas"]
    resumed = setup(tiny_config(scene_data, tmp_path / "run", *args, "optim.lr=5e-4", "optim.weight_decay=0.01",
                                "threads=1", "log_every=2"), resume="auto")
    assert "resumed with changed optim.lr, optim.weight_decay: applied from step 3 on" in caplog.text
    groups = resumed.optimizer.param_groups
    assert resumed.scheduler.base_lrs == [5e-4, 5e-4] and [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert groups[0]["lr"] == pytest.approx(5e-4 * resumed.scheduler.lr_lambdas[0](2))
    run_steps(resumed, wrap(resumed))
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    # each step logs the rate it trained at (it logged the next step's): warm-up 1e-3 * 1/2, then 1e-3
    assert [e["lr"] for e in logged[:2]] == pytest.approx([5e-4, 1e-3])
    assert logged[-1]["step"] == 4 and logged[-1]["lr"] == pytest.approx(5e-4 * resumed.scheduler.lr_lambdas[0](3))


def test_a_run_whose_loss_is_no_longer_finite_stops_in_one_line(scene_data, tmp_path):
    """It ran on, logged NaN, wrote a checkpoint and exported a model that the indexer then refused with a
    traceback (or stopped with torch.multinomial's traceback where ITM sampled negatives)."""
    from blipsearch.training.objectives import TrainingDivergedError

    for i, losses in enumerate(("objective.losses={itc: 1.0}", "objective.losses={itc: 1.0, itm: 1.0}")):
        run = setup(tiny_config(scene_data, tmp_path / f"run{i}", "optim.max_steps=6", "optim.lr=1e9",
                                "optim.warmup_steps=1", "save_every=1000", losses))
        with pytest.raises(TrainingDivergedError, match=r"lower optim.lr .* --resume auto"):
            run_steps(run, wrap(run))
        assert not (run.output / "checkpoint-last.pt").exists()
    # a finite loss whose gradients are not finite (an overflow in backward) stops it too
    run = setup(tiny_config(scene_data, tmp_path / "grads", "optim.max_steps=2", "save_every=1000"))
    real = torch.autograd.backward

    def overflowing(tensors, *args, **kwargs):
        real(tensors, *args, **kwargs)
        next(p for p in run.model.parameters() if p.grad is not None).grad.fill_(float("inf"))

    trained = [p for p in run.model.parameters() if p.requires_grad]  # (momentum copies move in the forward)
    torch.autograd.backward, before = overflowing, [p.detach().clone() for p in trained]
    try:
        with pytest.raises(TrainingDivergedError, match=r"at step 1 \(gradient norm\)"):
            run_steps(run, wrap(run))
    finally:
        torch.autograd.backward = real
    assert all(torch.equal(a, b) for a, b in zip(before, trained, strict=True))  # the step was not applied


def test_missing_and_undecodable_training_images_are_one_line_naming_the_file(scene_data, tmp_path):
    """A missing image failed at the first batch that reached it (hours in, on real data) with a message that
    named no file; from a loader worker, with the worker's whole traceback."""
    from blipsearch.retrieval.errors import ImageLoadError

    entries = json.loads((scene_data / "train.json").read_text())
    (scene_data / "images" / "damaged.png").write_bytes(b"\x89PNG not an image")
    for name, image, error, message in (
            ("train-missing.json", "train/nope.png", InvalidInputError, "1 of 41 training images are missing, e.g. "),
            ("train-damaged.json", "damaged.png", ImageLoadError, "training image ")):
        (scene_data / name).write_text(json.dumps([*entries, {**entries[0], "image": image}]))
        cfg = tiny_config(scene_data, tmp_path / name, f"data.train={scene_data / name}", "data.workers=2",
                          "data.batch_size=41", "optim.max_steps=1")
        with pytest.raises(error) as caught:
            run = setup(cfg)
            run_steps(run, wrap(run))
        assert str(caught.value).startswith(message) and str(scene_data / "images" / image) in str(caught.value)
        assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


def test_a_resumed_run_logs_each_step_once(scene_data, tmp_path):
    """Steps logged after the checkpoint a run resumes from are computed again; they were logged twice."""
    import json
    import shutil

    from blipsearch.training.checkpoint import LAST

    cfg = tiny_config(scene_data, tmp_path / "run", "optim.max_steps=5", "save_every=2", "log_every=1")
    first = setup(cfg)
    run_steps(first, wrap(first), until=2)
    shutil.copy(tmp_path / "run" / LAST, tmp_path / "step2.pt")
    second = setup(cfg, resume="auto")
    run_steps(second, wrap(second), until=4)
    with (tmp_path / "run" / "log.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by a kill
    resumed = setup(cfg, resume=str(tmp_path / "step2.pt"))  # back to an earlier checkpoint
    assert resumed.state.step == 2
    run_steps(resumed, wrap(resumed))
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]


def test_train_writes_log_checkpoint_and_hugging_face_exports(scene_data, tmp_path):
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    cfg = tiny_config(scene_data, tmp_path / "run", "optim.max_steps=2")
    out = train(cfg)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in lines] == [1, 2]
    assert (out / "checkpoint-last.pt").is_file()
    assert (out / "retrieval" / "model.safetensors").is_file()
    # as the umask makes any file (safetensors wrote the weights 0600: unreadable to a server of another user)
    mask = os.umask(0)
    os.umask(mask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.glob("*/*") if p.is_file()} == {oct(0o666 & ~mask)}
    captioner = BlipForConditionalGeneration.from_pretrained(out / "captioner")
    retrieval = BlipForImageTextRetrieval.from_pretrained(out / "retrieval")
    # encoder and decoder shared their embeddings and cross-attention in training; both exports carry them
    torch.testing.assert_close(captioner.text_decoder.bert.embeddings.word_embeddings.weight,
                               retrieval.text_encoder.embeddings.word_embeddings.weight)
    torch.testing.assert_close(captioner.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight,
                               retrieval.text_encoder.encoder.layer[0].crossattention.self.key.weight)
    # the run folder named as a model, or as the checkpoint to resume, says what to name instead
    from blipsearch.retrieval.errors import ModelLoadError
    from blipsearch.retrieval.models import load_model

    with pytest.raises(ModelLoadError, match=re.escape(f"is a training run's folder; pass the model it exported: "
                                                       f"{out / 'retrieval'} (retrieval) or {out / 'captioner'}")):
        load_model(str(out), device="cpu")
    with pytest.raises(InvalidInputError, match=re.escape(f"is a folder: name its checkpoint file "
                                                          f"({out / 'checkpoint-last.pt'})")):
        setup(tiny_config(scene_data, tmp_path / "again", "optim.max_steps=2"), resume=str(out))


def test_a_frozen_vit_stays_as_loaded_while_the_text_side_trains(scene_data, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    cfg = tiny_config(scene_data, tmp_path / "ft", f"model.init_from={tiny_model_dir}", "model.freeze_vision=true",
                      "optim.max_steps=3", "optim.lr=1e-2", "objective.losses={itc: 1.0, itm: 1.0}")
    run = setup(cfg)
    run_steps(run, wrap(run))
    start, ours = load_file(tiny_model_dir / "model.safetensors"), run.model.state_dict()
    vision = [k for k in start if k.startswith("vision_model.")]
    assert vision and all(torch.equal(ours[k], start[k]) for k in vision)
    assert not torch.equal(ours["text_proj.weight"], start["text_proj.weight"])  # the rest trained
    with pytest.raises(InvalidInputError, match="freeze_vision"):
        load_config(TINY, ["model.freeze_vision=true"])  # a random ViT would stay random
    with pytest.raises(InvalidInputError, match="freeze_vision"):
        load_config(None, ["model.family=blip-2", "model.freeze_vision=true", f"model.init_from={tiny_model_dir}"])


def test_gradient_accumulation_matches_the_loss_scale(scene_data, tmp_path):
    cfg = tiny_config(scene_data, tmp_path / "acc", "optim.max_steps=1", "optim.grad_accum=2", "save_every=1000")
    run = setup(cfg)
    entries = run_steps(run, wrap(run))
    assert run.state.batch == 2 and entries[0]["step"] == 1
    assert all(torch.isfinite(torch.tensor(entries[0][k])) for k in ("itc_loss", "itm_loss", "lm_loss"))


def test_fine_tuning_starts_from_a_hugging_face_checkpoint(scene_data, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    cfg = tiny_config(scene_data, tmp_path / "ft", f"model.init_from={tiny_model_dir}", "optim.max_steps=1",
                      "objective.losses={itc: 1.0, itm: 1.0}")
    run = setup(cfg)
    weights = load_file(tiny_model_dir / "model.safetensors")
    ours = run.model.state_dict()
    for key in ("vision_model.embeddings.patch_embedding.weight", "text_encoder.embeddings.word_embeddings.weight",
                "itm_head.weight", "text_proj.weight"):
        torch.testing.assert_close(ours[key], weights[key])
    for key in ("vision_model.embeddings.patch_embedding.weight", "text_proj.weight"):  # momentum copies too
        module, rest = key.split(".", 1)
        torch.testing.assert_close(ours[f"{module}_m.{rest}"], weights[key])
    assert run.model.text_decoder is None and run.model.ids.enc == run.tokenizer.convert_tokens_to_ids("[ENC]")
    run_steps(run, wrap(run))


def test_export_of_a_fine_tuned_run_names_the_checkpoint_it_started_from(scene_data, tmp_path, tiny_model_dir):
    """It said "model '...' is neither an existing directory nor a hub id", naming no key of the config."""
    import shutil

    from blipsearch.retrieval.errors import ModelLoadError
    from blipsearch.training.checkpoint import LAST
    from blipsearch.training.loop import export_checkpoint

    start = shutil.copytree(tiny_model_dir, tmp_path / "start")
    cfg = tiny_config(scene_data, tmp_path / "ft", f"model.init_from={start}", "optim.max_steps=1", "save_every=1",
                      "objective.losses={itc: 1.0, itm: 1.0}")
    run = setup(cfg)
    run_steps(run, wrap(run))
    start.rename(tmp_path / "moved")
    with pytest.raises(ModelLoadError, match=re.escape(f"builds its model from what its run started from "
                                                       f"(model.init_from={start}), and model ")):
        export_checkpoint(tmp_path / "ft" / LAST, tmp_path / "out")
