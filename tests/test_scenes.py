"""The synthetic scene generator: deterministic, captions that say what is drawn, binding twins in test."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import scenes, script
from PIL import Image

from blipsearch.retrieval.annotations import load_annotations

SIZES = {"train": 12, "val": 4, "test": 16}


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_bytes_other_seed_other_scenes(tmp_path):
    sc = scenes()
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        sc.write_dataset(tmp_path / name, seed=seed, size=48, sizes=SIZES)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_splits_load_as_lavis_annotations_with_several_phrasings(tmp_path):
    scenes().write_dataset(tmp_path, seed=0, size=48, sizes=SIZES)
    train = json.loads((tmp_path / "train.json").read_text())
    assert all(isinstance(e["caption"], str) for e in train)  # LAVIS training form: one caption per entry
    images = load_annotations(tmp_path / "train.json")
    assert len(images) == 12 and all(len(set(i.captions)) == 5 for i in images)
    test = load_annotations(tmp_path / "test.json")
    assert len(test) == 16 and all(len(i.captions) >= 5 for i in test)
    assert all((tmp_path / "images" / i.image).is_file() for i in test)


def test_test_split_has_binding_twins_that_differ_only_in_binding(tmp_path):
    sc = scenes()
    entries = {e["image"]: e for e in json.loads((_write(sc, tmp_path) / "test.json").read_text())}
    twins = [e for e in entries.values() if "twin" in e]
    assert len(twins) >= 4
    for entry in twins:
        twin = entries[entry["twin"]]
        assert twin["twin"] == entry["image"] and twin["swapped"] == entry["swapped"]
        # same words, different order: exactly an attribute-binding contrast
        ours, theirs = entry["caption"][0].split(), twin["caption"][0].split()
        assert sorted(ours) == sorted(theirs) and ours != theirs
    mirrored = [e for e in entries.values() if "mirror_caption" in e]
    assert mirrored and all(sorted(e["mirror_caption"].split()) == sorted(e["caption"][0].split())
                            and e["mirror_caption"] not in e["caption"] for e in mirrored)


def test_binding_twin_swaps_one_attribute_and_keeps_the_layout():
    import random

    sc = scenes()
    red_circle = sc.Thing("circle", "red", "small", 0.2, 0.5)
    blue_square = sc.Thing("square", "blue", "small", 0.8, 0.5)
    scene = sc.Scene((red_circle, blue_square), "left of")
    assert sc.captions(scene)[0] == "a small red circle left of a small blue square"
    twin, swapped = sc.binding_twin(scene, random.Random(0))
    assert [(t.x, t.y) for t in twin.things] == [(0.2, 0.5), (0.8, 0.5)]
    assert swapped in ("colour", "shape")
    assert sc.captions(twin)[0] in ("a small blue circle left of a small red square",
                                    "a small red square left of a small blue circle")


def test_rendering_puts_the_named_colour_where_the_relation_says():
    sc = scenes()
    scene = sc.Scene((sc.Thing("circle", "red", "large", 0.22, 0.5), sc.Thing("square", "blue", "large", 0.78, 0.5)),
                     "left of")
    pixels = np.asarray(sc.render(scene, 100))
    assert tuple(pixels[50, 22]) == sc.COLOURS["red"] and tuple(pixels[50, 78]) == sc.COLOURS["blue"]


def test_every_caption_word_is_in_the_vocabulary():
    import random

    sc = scenes()
    rng = random.Random(0)
    words = set(sc.vocabulary())
    for _ in range(200):
        for caption in sc.captions(sc.random_scene(rng)):
            assert set(caption.split()) <= words, caption


def test_demo_folder_is_pictures_only(tmp_path):
    scenes().main(["demo-folder", str(tmp_path / "demo"), "--count", "5", "--size", "40"])
    files = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert files == [f"scene-{i:03d}.png" for i in range(5)]


def _write(sc, root: Path) -> Path:
    sc.write_dataset(root, seed=0, size=48, sizes=SIZES)
    return root


@pytest.mark.parametrize("demo", ["demo_model", "blip2_demo_model"])
def test_binding_benchmark_runs_on_the_demo_models(tmp_path, demo):
    binding = script("scenes_binding")
    root = _write(scenes(), tmp_path)
    entries = {e["image"]: e for e in json.loads((root / "test.json").read_text())}
    pairs = binding.binding_pairs(root / "test.json")
    assert pairs
    for caption, own, twin in pairs:
        assert caption in entries[own]["caption"] and caption not in entries[twin]["caption"]
    from blipsearch.retrieval.models import load_model

    model = load_model(str(Path(__file__).parents[1] / "training" / demo), device="cpu", precision="fp32")
    result = binding.evaluate(model, root)
    assert result["binding"]["cases"] == len(pairs) and result["relation"]["cases"] > 0
    assert all(0 <= r[k] <= 1 for r in result.values() for k in ("itc_accuracy", "reranked_accuracy"))


def test_demo_folder_holds_the_readme_query_and_its_distractors(tmp_path):
    sc = scenes()
    assert "a red circle left of a blue square" in sc.captions(sc.SHOWCASE[0])
    assert "a blue circle left of a red square" in sc.captions(sc.SHOWCASE[1])
    assert "a blue square left of a red circle" in sc.captions(sc.SHOWCASE[2])  # the same things, places swapped
    assert "a red circle left of a blue square" not in sc.captions(sc.SHOWCASE[2])
    sc.write_demo_folder(tmp_path, count=10, seed=7, size=48)
    pictures = {np.asarray(Image.open(p)).tobytes() for p in tmp_path.glob("*.png")}
    assert all(np.asarray(sc.render(s, 48)).tobytes() in pictures for s in sc.SHOWCASE)


def test_grouped_train_split_batches_a_scene_with_its_mirror_and_twin_and_no_caption_true_for_two(tmp_path):
    sc = scenes()
    sc.write_dataset(tmp_path, seed=0, size=48, sizes={"train": 30, "val": 0, "test": 0}, groups=True)
    entries = json.loads((tmp_path / "train.json").read_text())
    grouped = sc.grouped_scenes(30, 0)
    by_image = {f"train/{i:06d}.png": (scene, group) for i, (scene, group) in enumerate(grouped)}
    assert {e["image"] for e in entries} == set(by_image)
    for entry in entries:
        scene, group = by_image[entry["image"]]
        assert entry["group"].split("-")[0] == str(group)
        others = [s for s, g in grouped if g == group and s != scene]
        assert entry["caption"] in sc.captions(scene)
        assert all(entry["caption"] not in sc.captions(other) for other in others)
    pairs = [(s, g) for s, g in grouped if len(s.things) == 2]
    mirrored = [s for s, g in pairs if any(o == sc.mirror_scene(s) for o, h in grouped if h == g)]
    assert mirrored  # a two-thing scene's group holds its mirror, whose first caption is the scene's mirror caption
    assert all(sc.captions(sc.mirror_scene(s))[0] == sc.mirror_caption(s) for s in mirrored)


def test_questions_are_answered_by_what_is_drawn(tmp_path):
    import random

    sc = scenes()
    rng, kinds = random.Random(0), set()
    for _ in range(300):
        scene = sc.random_scene(rng)
        by_shape = {t.shape: t for t in scene.things}
        for question, answer, kind in sc.questions(scene):
            kinds.add(kind)
            words = question.split()
            assert set(words) | set(answer.split()) <= set(sc.vocabulary())
            if kind == "colour":
                assert answer == by_shape[words[-2]].colour
            elif kind == "count":
                assert answer == {1: "one", 2: "two", 3: "three"}[len(scene.things)]
            else:  # "what is left of the square ?": the answer's thing lies on that side, by the drawing
                other = by_shape[words[-2]]
                thing = next(t for t in scene.things if t.name(False) == answer)
                side = " ".join(words[2:-3])
                dx, dy = thing.x - other.x, thing.y - other.y
                holds = {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[side]
                assert holds, (question, answer)
    assert kinds == {"colour", "relation", "count"}
    sc.write_dataset(tmp_path, seed=0, size=32, sizes={"train": 6, "val": 0, "test": 4}, with_questions=True)
    train = json.loads((tmp_path / "train.json").read_text())
    asked = [e for e in train if "instruction" in e]
    assert asked and all(e["caption"] and e["instruction"].endswith("?") for e in asked)
    test = json.loads((tmp_path / "test.json").read_text())
    assert all(e["questions"] and {"question", "answer", "type"} == set(e["questions"][0]) for e in test)
