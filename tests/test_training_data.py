"""Training data: both annotation sources, the resumable per-rank batch order, seeded augmentation."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from blipsearch.retrieval.errors import InvalidInputError
from blipsearch.training.data import EpochBatches, augment, folder_samples, json_samples, load_samples


def _image(path, colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_caption_folder_pairs_each_line_and_skips_images_without_captions(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\n\n  a small red square  \n")
    _image(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.txt").write_text("a blue thing\n")
    _image(tmp_path / "c.png")  # no caption: not a training pair
    samples = folder_samples(tmp_path)
    assert [(s.image.name, s.caption, s.image_id) for s in samples] == [
        ("a.png", "a red square", 0), ("a.png", "a small red square", 0), ("b.jpg", "a blue thing", 1)]
    assert [s.sample_id for s in samples] == [0, 1, 2]


def test_a_caption_file_that_is_not_utf8_is_one_line(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(InvalidInputError, match=r"caption file .*a\.txt is not UTF-8 text \(byte 4\)"):
        folder_samples(tmp_path)


def test_one_image_spelled_two_ways_in_one_file_is_one_image(tmp_path):
    """It got two ids, so its own captions were each other's ITC and ITM negatives."""
    _image(tmp_path / "images" / "train" / "a.png")
    _image(tmp_path / "images" / "train" / "b.png")
    entries = [{"image": "train/a.png", "caption": "one"}, {"image": "train/../train/a.png", "caption": "two"},
               {"image": "train/b.png", "caption": "three"}]
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    assert [s.image_id for s in load_samples(tmp_path / "ann.json")] == [0, 0, 1]


def test_folder_without_captions_is_an_error(tmp_path):
    _image(tmp_path / "a.png")
    with pytest.raises(InvalidInputError, match=r"photo\.txt"):
        folder_samples(tmp_path)


def test_lavis_and_karpathy_files_give_the_same_pairs(tmp_path):
    (tmp_path / "images").mkdir()
    lavis = [{"image": "x.png", "caption": "one"}, {"image": "x.png", "caption": "two"},
             {"image": "y.png", "caption": "three"}]
    karpathy = {"images": [{"filename": "x.png", "split": "train", "sentences": [{"raw": "one"}, {"raw": "two"}]},
                           {"filename": "y.png", "split": "restval", "sentences": [{"raw": "three"}]},
                           {"filename": "z.png", "split": "test", "sentences": [{"raw": "held out"}]}]}
    (tmp_path / "lavis.json").write_text(json.dumps(lavis))
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    a, b = json_samples(tmp_path / "lavis.json"), load_samples(tmp_path / "karpathy.json")
    assert [(s.image, s.caption, s.image_id) for s in a] == [(s.image, s.caption, s.image_id) for s in b]
    assert a[0].image == tmp_path / "images" / "x.png" and [s.image_id for s in a] == [0, 0, 1]


def test_ranks_split_each_global_batch_and_resume_mid_epoch():
    single = EpochBatches(50, batch_size=8, seed=3)
    ranks = [EpochBatches(50, batch_size=4, seed=3, rank=r, world=2) for r in (0, 1)]
    assert single.batches_per_epoch == ranks[0].batches_per_epoch == 6  # 2 pairs dropped
    for whole, *parts in zip(single, *ranks, strict=True):
        assert whole == parts[0] + parts[1]
    everything = list(single)
    single.set_position(epoch=0, start=4)
    assert list(single) == everything[4:] and len(single) == 2
    single.set_position(epoch=1, start=0)
    assert list(single) != everything  # a new epoch, a new order


def test_augmentation_is_seeded_and_crop_keeps_the_size():
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    a = augment(pixels, random.Random("0-1-7"), (0.5, 1.0), hflip=True)
    b = augment(pixels, random.Random("0-1-7"), (0.5, 1.0), hflip=True)
    assert a.shape == pixels.shape and np.array_equal(a, b)
    assert np.array_equal(augment(pixels, random.Random(1)), pixels)  # defaults: no crop, no flip


def test_group_batches_keep_each_group_together_and_stay_seeded_and_resumable():
    groups = [f"g{i // 3}" for i in range(24)] + [None] * 8  # 8 groups of 3 samples, 8 samples of their own
    sampler = EpochBatches(32, batch_size=6, seed=5, groups=groups)
    batches = list(sampler)
    assert len(batches) == 5 and all(len(b) == 6 for b in batches)  # 30 of 32: the incomplete batch is dropped
    order = [i for b in batches for i in b]
    for g in range(8):  # a group's samples are consecutive in the epoch's order
        where = [order.index(i) for i in range(3 * g, 3 * g + 3) if i in order]
        assert where == list(range(where[0], where[0] + len(where)))
    assert list(EpochBatches(32, batch_size=6, seed=5, groups=groups)) == batches  # seeded
    sampler.set_position(epoch=0, start=3)
    assert list(sampler) == batches[3:]
    sampler.set_position(epoch=1, start=0)
    assert list(sampler) != batches


def test_annotation_groups_reach_the_samples(tmp_path):
    (tmp_path / "images").mkdir()
    entries = [{"image": "x.png", "caption": "one", "group": "7-0"}, {"image": "x.png", "caption": "two"},
               {"image": "y.png", "caption": "three", "group": "7-0"}]
    (tmp_path / "a.json").write_text(json.dumps(entries))
    assert [s.group for s in json_samples(tmp_path / "a.json")] == ["7-0", None, "7-0"]


def test_several_training_files_read_as_one_dataset_keep_ids_and_groups_apart(tmp_path):
    from blipsearch.training.config import load_config

    (tmp_path / "images").mkdir()
    (tmp_path / "a.json").write_text(json.dumps([{"image": "x.png", "caption": "one", "group": "0-0"},
                                                 {"image": "y.png", "caption": "two", "group": "0-0"}]))
    (tmp_path / "b.json").write_text(json.dumps([{"image": "x.png", "caption": "three", "group": "0-0"},
                                                 {"image": "x.png", "caption": "four"}]))
    cfg = load_config(None, [f"data.train=[{tmp_path / 'a.json'}, {tmp_path / 'b.json'}]"])
    samples = load_samples(cfg.data.train)
    assert [s.caption for s in samples] == ["one", "two", "three", "four"]
    assert [s.sample_id for s in samples] == [0, 1, 2, 3]
    assert [s.image_id for s in samples] == [0, 1, 0, 0]  # x.png is one image, whichever file names it
    assert [s.group for s in samples] == ["0/0-0", "0/0-0", "1/0-0", None]
    assert [s.image for s in samples[1:3]] == [tmp_path / "images" / "y.png", tmp_path / "images" / "x.png"]
    assert load_samples((str(tmp_path / "b.json"),)) == load_samples(tmp_path / "b.json")  # one: unchanged
    with pytest.raises(InvalidInputError, match="list of paths"):
        load_config(None, ["data.train=[a.json, 3]"])
    with pytest.raises(InvalidInputError, match="list of paths"):
        load_config(None, ["data.train=7"])
    assert not load_config(None, ["data.train="]).data.train  # unset: a mixture may take its place


def test_a_mixture_draws_each_batch_from_one_dataset_by_the_square_root_of_its_size(tmp_path):
    from blipsearch.training.data import MixtureBatches, load_mixture

    (tmp_path / "images").mkdir()
    for name, count in (("big", 400), ("small", 100)):
        entries = [{"image": f"{name}{i}.png", "caption": f"{name} {i}"} for i in range(count)]
        (tmp_path / f"{name}.json").write_text(json.dumps(entries))
    sources = {str(tmp_path / "big.json"): None, str(tmp_path / "small.json"): None}
    samples, sizes, weights = load_mixture(sources)
    assert sizes == [400, 100] and weights == [20.0, 10.0]
    assert [s.sample_id for s in samples] == list(range(500)) and len({s.image_id for s in samples}) == 500
    sampler = MixtureBatches(sizes, weights, batch_size=4, seed=1)
    batches = list(sampler)
    assert len(batches) == 125
    from_big = [all(i < 400 for i in b) for b in batches]
    assert all(all(i >= 400 for i in b) for b, big in zip(batches, from_big, strict=True) if not big)  # one dataset
    assert abs(sum(from_big) / len(batches) - 2 / 3) < 0.1  # sqrt(400) : sqrt(100) = 2 : 1
    sampler.set_position(epoch=0, start=100)
    assert list(sampler) == batches[100:]  # resumed: the same draws
    even = list(MixtureBatches(sizes, [1.0, 1.0], batch_size=4, seed=1))  # weights given
    assert abs(sum(all(i < 400 for i in b) for b in even) / len(even) - 0.5) < 0.1
    ranks = [list(MixtureBatches(sizes, weights, batch_size=2, seed=1, rank=r, world=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == batches  # ranks split each global batch
    with pytest.raises(InvalidInputError, match="fewer than one global batch"):
        MixtureBatches([400, 3], weights, batch_size=4, seed=1)
