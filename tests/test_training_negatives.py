"""ITM caption negatives: read from JSON, drawn per sample, ranked below the image's own caption in
`itm_neg_loss`; off (or absent) they change nothing."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from blipsearch.retrieval.annotations import load_annotations
from blipsearch.retrieval.errors import InvalidInputError
from blipsearch.retrieval.models.base import Preprocessing
from blipsearch.training.config import load_config
from blipsearch.training.data import CaptionDataset, Collate, json_samples
from blipsearch.training.families import FAMILIES
from blipsearch.training.loop import ObjectiveModule, run_steps, setup, wrap
from blipsearch.training.objectives import OBJECTIVES, Batch, BlipObjective, Progress
from blipsearch.training.tokenizer import word_tokenizer

import ddp
from test_training_loop import scenes, tiny_config
from test_training_model import batch_of, tiny

CAPTIONS = ["a red circle left of a blue square", "a small green triangle", "a blue square above a red circle"]
NEGATIVES = ["a blue square left of a red circle", "a red square above a blue circle"]
PRE = Preprocessing(height=16, width=16, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture(scope="module")
def scene_data(tmp_path_factory):
    """20 training images (100 pairs), 4 val, 4 test."""
    root = tmp_path_factory.mktemp("scenes")
    scenes().write_dataset(root, seed=0, size=64, sizes={"train": 20, "val": 4, "test": 4})
    return root


def _annotations(tmp_path, negatives=NEGATIVES):
    for name in ("a", "b"):
        Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / f"{name}.png")
    entries = [{"image": "a.png", "caption": CAPTIONS[0], "negative_captions": negatives},
               {"image": "a.png", "caption": CAPTIONS[2]},
               {"image": "b.png", "caption": CAPTIONS[1]}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def test_negative_captions_are_read_drawn_per_sample_and_tokenised(tmp_path):
    samples = json_samples(_annotations(tmp_path))
    assert [s.negative_captions for s in samples] == [tuple(NEGATIVES), tuple(NEGATIVES), ()]
    tokenizer = word_tokenizer(CAPTIONS + NEGATIVES)
    dataset = CaptionDataset(samples, PRE, seed=3)
    items = [dataset[i] for i in range(3)]
    assert [dataset[i]["negative_caption"] for i in range(3)] == [item["negative_caption"] for item in items]
    assert items[0]["negative_caption"] in NEGATIVES and items[2]["negative_caption"] is None
    batch = Collate(tokenizer, max_tokens=32)(items)
    assert batch.negative_rows.tolist() == [0, 1]
    expected = tokenizer([items[0]["negative_caption"], items[1]["negative_caption"]], padding="longest",
                         return_tensors="pt")
    assert torch.equal(batch.negative_input_ids, expected["input_ids"])
    assert torch.equal(batch.negative_attention_mask, expected["attention_mask"])
    # over epochs both negatives are drawn
    drawn = set()
    for epoch in range(20):
        dataset.epoch = epoch
        drawn.add(dataset[0]["negative_caption"])
    assert drawn == set(NEGATIVES)


def test_batch_without_negatives_is_as_before(tmp_path):
    samples = json_samples(_annotations(tmp_path, negatives=[]))
    assert all(s.negative_captions == () for s in samples)
    dataset = CaptionDataset(samples, PRE)
    batch = Collate(word_tokenizer(CAPTIONS), max_tokens=32)([dataset[i] for i in range(3)])
    assert batch.negative_input_ids is None and batch.negative_rows is None
    assert batch.to(torch.device("cpu")).negative_rows is None


def test_negative_captions_must_be_strings(tmp_path):
    with pytest.raises(InvalidInputError, match="negative_captions"):
        json_samples(_annotations(tmp_path, negatives="a blue square"))


def _model(family, overrides=()):
    base = ["model.preset=tiny", "model.text_dropout=0.0", "objective.queue_size=6", "objective.losses={itm: 1.0}"]
    if family == "blip-2":
        base += ["model.family=blip-2", "model.num_query_tokens=4"]
    cfg = load_config(None, [*base, *overrides])
    tokenizer = word_tokenizer(CAPTIONS + NEGATIVES)
    torch.manual_seed(0)
    return FAMILIES[family].build(cfg, tokenizer), tokenizer, cfg


def _batch(tokenizer, with_negatives=True):
    torch.manual_seed(0)
    tokens = tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    batch = Batch(torch.randn(3, 3, 32, 32), tokens["input_ids"], tokens["attention_mask"], torch.arange(3),
                  torch.arange(3))
    if with_negatives:
        negatives = tokenizer(NEGATIVES, padding="longest", return_tensors="pt")
        batch.negative_input_ids, batch.negative_attention_mask = negatives["input_ids"], negatives["attention_mask"]
        batch.negative_rows = torch.tensor([0, 2])
    return batch


def _losses(family, overrides=(), with_negatives=True, step=0):
    model, tokenizer, cfg = _model(family, overrides)
    model.train()
    objective = OBJECTIVES[family](cfg.objective)
    return objective(model, _batch(tokenizer, with_negatives), Progress(step, 0.0, seed=11)), model


@pytest.mark.parametrize("family", ["blip", "blip-2"])
def test_negative_loss_ranks_the_true_caption_above_the_false_one(family):
    losses, model = _losses(family, ["objective.caption_negatives=0.5"])
    _, tokenizer, _ = _model(family)
    batch = _batch(tokenizer)
    rows = batch.negative_rows
    with torch.no_grad():
        image_embeds = model.encode_image(batch.pixel_values)[0]  # (B, T, Hv)
        false = model.itm_logits(batch.negative_input_ids, batch.negative_attention_mask,
                                 image_embeds[rows])  # (2, 2) [no match, match]
        true = model.itm_logits(batch.input_ids[rows], batch.attention_mask[rows], image_embeds[rows])
    log_odds = [F.log_softmax(x, dim=1) for x in (true, false)]
    odds_true, odds_false = (x[:, 1] - x[:, 0] for x in log_odds)
    expected = 0.5 * -torch.log(torch.sigmoid(odds_true - odds_false)).mean()
    assert set(losses) == {"itm_loss", "itm_neg_loss"}
    torch.testing.assert_close(losses["itm_neg_loss"].detach(), expected, rtol=1e-5, atol=1e-6)
    losses["itm_neg_loss"].backward()
    assert model.itm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["blip", "blip-2"])
def test_off_or_absent_negatives_leave_the_losses_bit_identical(family):
    full = ["objective.losses={itc: 1.0, itm: 1.0, " + ("lm" if family == "blip" else "itg") + ": 1.0}"]
    today, _ = _losses(family, full, with_negatives=False)
    off, _ = _losses(family, full)  # negatives in the batch, weight 0
    on_without, _ = _losses(family, [*full, "objective.caption_negatives=1.0"], with_negatives=False)
    assert set(off) == set(today) and all(torch.equal(off[k], today[k]) for k in today)
    assert all(torch.equal(on_without[k], today[k]) for k in today)
    assert float(on_without["itm_neg_loss"]) == 0.0


def test_caption_negatives_need_itm():
    with pytest.raises(InvalidInputError, match="caption_negatives"):
        load_config(None, ["objective.losses={itc: 1.0}", "objective.caption_negatives=1.0"])
    with pytest.raises(InvalidInputError, match="caption_negatives"):
        load_config(None, ["objective.caption_negatives=-1"])


def test_scenes_train_entries_carry_false_captions(scene_data):
    entries = json.loads((scene_data / "train.json").read_text(encoding="utf-8"))
    relations = ("left of", "right of", "above", "below")
    related = [e for e in entries if any(f" {r} a " in e["caption"] for r in relations)]
    assert related and all(e.get("negative_captions") for e in related)
    for entry in entries:
        assert entry["caption"] not in entry.get("negative_captions", [])
    truths = {item.image: set(item.captions) for item in load_annotations(scene_data / "train.json")}
    assert all(not truths[e["image"]] & set(e.get("negative_captions", [])) for e in entries)
    for split in ("val", "test"):
        assert all("negative_captions" not in e for e in json.loads((scene_data / f"{split}.json").read_text()))


def test_scenes_mirror_caption_is_a_negative_of_two_thing_scenes():
    sc = scenes()
    scene = sc.Scene((sc.Thing("circle", "red", "large", 0.25, 0.5), sc.Thing("square", "blue", "small", 0.75, 0.5)),
                     "left of")
    negatives = sc.false_captions(scene, random.Random(0))
    assert negatives[0] == "a small blue square left of a large red circle"
    assert len(negatives) == 2 and not set(negatives) & set(sc.captions(scene))


def test_scenes_caption_negatives_keep_the_phrasing_of_their_caption():
    """Per caption: the same words with the things exchanged, or with an attribute swapped between them, so
    that nothing but order or binding tells a negative from its caption; never a caption true for the picture."""
    sc = scenes()
    scene = sc.Scene((sc.Thing("circle", "red", "large", 0.25, 0.5), sc.Thing("square", "blue", "small", 0.75, 0.5)),
                     "left of")
    negatives = sc.false_captions(scene, random.Random(0), "there is a large red circle left of a small blue square")
    assert negatives[0] == "there is a small blue square left of a large red circle"
    assert len(negatives) == 2 and negatives[1].startswith("there is a ")
    assert sorted(negatives[1].split()) == sorted(negatives[0].split())  # the twin's: same words, other binding
    # "a large red circle and a small blue square" is true of the mirror too: only the twin's version is false
    unordered = sc.false_captions(scene, random.Random(0), "a large red circle and a small blue square")
    assert len(unordered) == 1 and unordered[0] not in sc.captions(scene)
    for caption in sc.captions(scene):
        assert not set(sc.false_captions(scene, random.Random(0), caption)) & set(sc.captions(scene))
    # two things that differ in colour only: swapping the colour exchanges them, which the unordered phrasing
    # cannot tell; it gets no negative at all
    alike = sc.Scene((sc.Thing("circle", "red", "large", 0.25, 0.5), sc.Thing("circle", "blue", "large", 0.75, 0.5)),
                     "left of")
    assert sc.false_captions(alike, random.Random(0), "a large red circle and a large blue circle") == []
    assert sc.false_captions(alike, random.Random(0), "a large red circle left of a large blue circle") == [
        "a large blue circle left of a large red circle"]  # mirror and twin are the same picture here
    one = sc.Scene((sc.Thing("circle", "red", "large", 0.5, 0.5),))
    assert sc.false_captions(one, random.Random(0), sc.captions(one)[0]) == []


def test_scene_negatives_give_every_caption_of_a_scene_the_same_negatives(tmp_path):
    sc = scenes()
    per_caption, per_scene = (json.loads(sc.write_split(tmp_path / name, "train", 12, 0, 32,
                                                        scene_negatives=name == "scene").read_text())
                              for name in ("caption", "scene"))
    by_image = {}
    for entry in per_scene:
        by_image.setdefault(entry["image"], set()).add(tuple(entry.get("negative_captions", ())))
    assert all(len(negatives) == 1 for negatives in by_image.values())
    assert [e["caption"] for e in per_caption] == [e["caption"] for e in per_scene]  # only the negatives differ
    pairs = zip(per_caption, per_scene, strict=True)
    assert any(a.get("negative_captions") != b.get("negative_captions") for a, b in pairs)


@pytest.mark.usefixtures("training_threads")  # its config sets threads=1
@pytest.mark.parametrize("family", ["blip", "blip-2"])
def test_tiny_run_with_negatives_is_finite(scene_data, tmp_path, family):
    extra = ["model.family=blip-2", "model.num_query_tokens=4", "objective.losses={itc: 1.0, itm: 1.0, itg: 1.0}"] \
        if family == "blip-2" else []
    cfg = tiny_config(scene_data, tmp_path / "run", "optim.max_steps=3", "save_every=1000",
                      "objective.caption_negatives=1.0", *extra)
    run = setup(cfg)
    entries = run_steps(run, wrap(run))
    assert len(entries) == 3
    assert all(torch.isfinite(torch.tensor(e["itm_neg_loss"])) and e["itm_neg_loss"] > 0 for e in entries)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in entries)



# --- two processes: each rank's share of the global mean, no gathering -----------------------------------

DDP_NEGATIVES = {0: "a blue square left of a red circle", 1: "a small red square",
                 2: "a red circle above a blue square"}  # all on rank 0's half: rank 1 has none


def _ddp_build():
    return tiny(["objective.caption_negatives=0.5"])


def _ddp_global_batch(tokenizer) -> Batch:
    batch = batch_of(tokenizer, ddp.CAPTIONS, ddp.IMAGE_IDS, seed=1)
    negatives = tokenizer(list(DDP_NEGATIVES.values()), padding="longest", return_tensors="pt")
    batch.negative_input_ids, batch.negative_attention_mask = negatives["input_ids"], negatives["attention_mask"]
    batch.negative_rows = torch.tensor(list(DDP_NEGATIVES))
    return batch


def _with_negatives(half: Batch, batch: Batch, rank: int) -> Batch:
    """The harness's half of `batch`, with the negatives of its rows (renumbered, padded to their longest)."""
    keep = (batch.negative_rows >= rank * 3) & (batch.negative_rows < rank * 3 + 3)
    if keep.any():
        length = int(batch.negative_attention_mask[keep].sum(1).max())
        half.negative_input_ids = batch.negative_input_ids[keep, :length]
        half.negative_attention_mask = batch.negative_attention_mask[keep, :length]
        half.negative_rows = batch.negative_rows[keep] - rank * 3
    return half


def _ddp_worker(rank: int, init_file: str, results):
    plain = ddp.half
    ddp.half = lambda batch, r: _with_negatives(plain(batch, r), batch, r)  # this process only
    _, out, dist = ddp.ddp_steps(rank, init_file, _ddp_build, BlipObjective, _ddp_global_batch)
    results[rank] = out
    dist.destroy_process_group()


def test_two_processes_equal_one_process_with_negatives_on_one_rank(tmp_path):
    with ddp.one_torch_thread():
        model, tokenizer, cfg = _ddp_build()
        single = ddp.steps(ObjectiveModule(model, BlipObjective(cfg.objective)), model,
                           [_ddp_global_batch(tokenizer)] * ddp.STEPS, lambda v: v)
    results = ddp.run_two_ranks(_ddp_worker, tmp_path)
    for rank in (0, 1):
        ddp.assert_same_as_single(results[rank], single, {"itc_loss", "itm_loss", "lm_loss", "itm_neg_loss"})
