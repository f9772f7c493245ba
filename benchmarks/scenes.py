"""Synthetic compositional scenes: 1-3 shapes with colour, size and a spatial relation, drawn with PIL.

Every scene comes with several caption phrasings. The test split holds *binding twins*: two images with
the same layout whose objects swap one attribute ("a red circle left of a blue square" vs "a blue circle
left of a red square"). A bag-of-words embedding (ITC) cannot tell twins apart; cross-attention (ITM)
can, so the twins are where re-ranking should win.

    python benchmarks/scenes.py dataset OUT --seed 0        # OUT/{train,val,test}.json + OUT/images/
    python benchmarks/scenes.py dataset OUT --questions     # also questions with their answers (InstructBLIP)
    python benchmarks/scenes.py demo-folder OUT --seed 7    # a folder of pictures to index and search

The JSON files use the LAVIS form that `load_annotations` and `blipsearch train` read: training entries
carry one caption each (and `negative_captions`, false for the picture: the same caption with its things
exchanged, and with an attribute swapped between them), val/test entries a list. With `--questions`,
training entries also hold question/answer pairs (`"instruction"`: the question, `"caption"`: the answer)
and val/test entries a `"questions"` list of {question, answer, type}. Output is identical for identical
arguments.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 20),
}
SIZES = {"small": 0.09, "large": 0.15}  # radius as a fraction of the canvas side
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
OBJECT_COUNTS = (1, 2, 2, 2, 3, 3)  # drawn uniformly: 2-object scenes are the common case
SPLIT_SIZES = {"train": 6000, "val": 300, "test": 500}
CAPTIONS_PER_TRAIN_IMAGE = 5


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    x: float  # centre, as a fraction of the canvas width
    y: float  # centre, as a fraction of the canvas height

    def name(self, with_size: bool = True) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    relation: str = ""  # things[0] <relation> things[1]; for three things, also things[1] <relation> things[2]
    background: int = 255  # grey level


# --- layout -----------------------------------------------------------------------------------------

def random_scene(rng: random.Random) -> Scene:
    count = rng.choice(OBJECT_COUNTS)
    relation = rng.choice(RELATIONS) if count > 1 else ""
    slots = _slots(rng, count, relation)
    things, used = [], set()
    for x, y in slots:
        while True:  # distinct (shape, colour) per scene so that every caption names one thing
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            if (shape, colour) not in used:
                break
        used.add((shape, colour))
        things.append(Thing(shape, colour, rng.choice(list(SIZES)), x, y))
    return Scene(tuple(things), relation, rng.randint(225, 255))


def _slots(rng: random.Random, count: int, relation: str) -> list[tuple[float, float]]:
    """Centres along the relation's axis, first thing first; jitter across the axis."""
    if count == 1:
        return [(rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75))]
    lanes = [0.22, 0.78] if count == 2 else [0.2, 0.5, 0.8]
    if relation in ("right of", "below"):
        lanes = lanes[::-1]  # things[0] is right of / below things[1]
    across = rng.uniform(0.3, 0.7)
    jitter = [across + rng.uniform(-0.06, 0.06) for _ in lanes]
    along = [lane + rng.uniform(-0.04, 0.04) for lane in lanes]
    horizontal = relation in ("left of", "right of")
    return [(a, j) if horizontal else (j, a) for a, j in zip(along, jitter, strict=True)]


def binding_twin(scene: Scene, rng: random.Random) -> tuple[Scene, str] | None:
    """The same layout with one attribute swapped between the first two things, or None if equal."""
    a, b = scene.things[0], scene.things[1]
    options = [attr for attr in ("colour", "shape", "size") if getattr(a, attr) != getattr(b, attr)]
    if not options:
        return None
    attr = rng.choice(options)
    swapped = (replace(a, **{attr: getattr(b, attr)}), replace(b, **{attr: getattr(a, attr)}))
    return replace(scene, things=swapped + scene.things[2:]), attr


def mirror_caption(scene: Scene) -> str:
    """The first caption with the two things exchanged: the same words, false for this picture."""
    a, b = scene.things[0], scene.things[1]
    return f"a {b.name()} {scene.relation} a {a.name()}"


def mirror_scene(scene: Scene) -> Scene:
    """The first two things exchanged in place: the picture that the mirror caption describes."""
    a, b = scene.things[0], scene.things[1]
    return replace(scene, things=(replace(b, x=a.x, y=a.y), replace(a, x=b.x, y=b.y), *scene.things[2:]))


def false_captions(scene: Scene, rng: random.Random, caption: str | None = None) -> list[str]:
    """ITM caption negatives for a training scene, without repeats; none for one thing.

    With `caption` (one of `captions(scene)`): the same phrasing of the mirror scene (its first two things
    exchanged) and of the binding twin (one attribute swapped between them), each kept only where it is
    false for the picture. A scene's entries then hold the mirror and twin of every phrasing, where before
    they held the first phrasing's only, which the other phrasings of the true caption told apart by their
    format. (`blipsearch train` pools an image's negatives and draws one per sample.) Without: the mirror
    caption (two things) and the twin's first caption."""
    if len(scene.things) < 2:
        return []
    twin = binding_twin(scene, rng)
    if caption is None:
        out = [mirror_caption(scene)] if len(scene.things) == 2 else []
        return list(dict.fromkeys(out + ([captions(twin[0])[0]] if twin is not None else [])))
    phrasings = captions(scene)
    slot, true = phrasings.index(caption), set(phrasings)
    ordered = caption != unordered_caption(scene)
    versions = ([mirror_scene(scene)] if ordered else []) + ([twin[0]] if twin is not None else [])
    if not ordered:  # a twin whose swap only exchanged two things is the same set of things: true, unordered
        versions = [v for v in versions if sorted(t.name() for t in v.things) != sorted(t.name() for t in scene.things)]
    return list(dict.fromkeys(text for text in (captions(v)[slot] for v in versions) if text not in true))


# --- captions ---------------------------------------------------------------------------------------

def captions(scene: Scene) -> list[str]:
    """Every phrasing of the scene; each one names all things with their attributes."""
    things = scene.things
    if len(things) == 1:
        t = things[0]
        return [f"a {t.name()}", f"a {t.name()} on a plain background", f"a picture of a {t.name()}",
                f"one {t.name()}", f"a single {t.name()}"]
    a, b, r = things[0], things[1], scene.relation
    if len(things) == 2:
        return [f"a {a.name()} {r} a {b.name()}", f"a {b.name()} {INVERSE[r]} a {a.name()}",
                f"a {a.name(False)} {r} a {b.name(False)}", f"a {b.name(False)} {INVERSE[r]} a {a.name(False)}",
                f"there is a {a.name()} {r} a {b.name()}", f"a {a.name()} and a {b.name()}"]
    c = things[2]
    order = "from left to right" if r == "left of" else "from right to left" if r == "right of" else \
        "from top to bottom" if r == "above" else "from bottom to top"
    return [f"a {a.name()} , a {b.name()} and a {c.name()} {order}",
            f"a {a.name()} {r} a {b.name()} {r} a {c.name()}",
            f"a {c.name()} {INVERSE[r]} a {b.name()} {INVERSE[r]} a {a.name()}",
            f"a {a.name(False)} {r} a {b.name(False)} {r} a {c.name(False)}",
            f"three shapes : a {a.name()} , a {b.name()} and a {c.name()}"]


def unordered_caption(scene: Scene) -> str | None:
    """The phrasing that names two or three things without their order (the last of `captions`), true for
    the mirror scene too; None for one thing."""
    return captions(scene)[-1] if len(scene.things) > 1 else None


def questions(scene: Scene) -> list[tuple[str, str, str]]:
    """(question, answer, type) that the picture answers: the colour of each shape the scene holds once
    ("colour"), what is on a side of a shape ("relation", two things), and how many shapes there are
    ("count")."""
    shapes = [t.shape for t in scene.things]
    out = [(f"what colour is the {t.shape} ?", t.colour, "colour") for t in scene.things if shapes.count(t.shape) == 1]
    if len(scene.things) == 2:
        a, b = scene.things
        if shapes.count(b.shape) == 1:
            out.append((f"what is {scene.relation} the {b.shape} ?", a.name(False), "relation"))
        if shapes.count(a.shape) == 1:
            out.append((f"what is {INVERSE[scene.relation]} the {a.shape} ?", b.name(False), "relation"))
    out.append(("how many shapes are there ?", NUMBERS[len(scene.things)], "count"))
    return out


NUMBERS = {1: "one", 2: "two", 3: "three"}


def vocabulary() -> list[str]:
    """Every word a caption, a question or an answer can contain, sorted: the demo tokenizer's vocabulary."""
    words = {"a", "on", "plain", "background", "picture", "of", "one", "single", "there", "is", "and",
             "three", "shapes", ":", ",", "from", "to", "left", "right", "top", "bottom", "above", "below",
             "what", "colour", "the", "how", "many", "are", "two", "?"}
    words.update(SHAPES, COLOURS, SIZES)
    return sorted(words)


# --- drawing ----------------------------------------------------------------------------------------

def render(scene: Scene, size: int = 128) -> Image.Image:
    image = Image.new("RGB", (size, size), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    for t in scene.things:
        r, cx, cy = SIZES[t.size] * size, t.x * size, t.y * size
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[t.colour]
        if t.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif t.shape == "square":
            draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
        elif t.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return image


# --- splits -----------------------------------------------------------------------------------------

def split_scenes(split: str, count: int, seed: int) -> list[tuple[Scene, int | None, str]]:
    """(scene, index of its binding twin or None, swapped attribute) for one split.

    The test split draws two-or-three-thing scenes in twin pairs for half of its images.
    """
    rng = random.Random(f"scenes-{seed}-{split}")
    out: list[tuple[Scene, int | None, str]] = []
    while len(out) < count:
        scene = random_scene(rng)
        twin = binding_twin(scene, rng) if split == "test" and len(scene.things) > 1 else None
        if twin is not None and len(out) + 2 <= count and rng.random() < 0.7:
            first = len(out)
            out += [(scene, first + 1, twin[1]), (twin[0], first, twin[1])]
        else:
            out.append((scene, None, ""))
    return out


def grouped_scenes(count: int, seed: int) -> list[tuple[Scene, int]]:
    """(scene, group) for a training split in groups: each scene, then its mirror (two things) and its binding
    twin (two or three things), so that a batch can hold the pictures that only word order and binding tell
    apart."""
    rng = random.Random(f"groups-{seed}")
    out: list[tuple[Scene, int]] = []
    group = 0
    while len(out) < count:
        scene = random_scene(rng)
        members = [scene]
        if len(scene.things) == 2:
            members.append(mirror_scene(scene))
        twin = binding_twin(scene, rng) if len(scene.things) > 1 else None
        if twin is not None:
            members.append(twin[0])
        out += [(member, group) for member in members[:count - len(out)]]
        group += 1
    return out


def _telling_captions(scene: Scene, others: list[Scene]) -> list[str]:
    """The scene's captions that are false for the other members of its group: a batch holding the group
    then has no caption true for two of its pictures. Out go the phrasings that another member shares (a
    size-free caption when the twin swapped sizes) and those that name the things without their order ("a red
    circle and a blue square" is true for the mirror too)."""
    shared = {text for other in others for text in captions(other)}
    return [text for text in captions(scene) if text not in shared and text != unordered_caption(scene)]


def write_split(root: Path, split: str, count: int, seed: int, size: int, groups: bool = False,
                with_questions: bool = False, scene_negatives: bool = False) -> Path:
    """`groups` (train only): the split of `grouped_scenes`; each entry names its group and caption slot as
    `"group"`, so a trainer can batch a scene's captions with its mirror's and its twin's. `with_questions`:
    question/answer pairs too (see the module docstring). `scene_negatives`: the same negatives for every
    caption of a scene (the mirror caption, the twin's first caption), as the generator wrote them before
    negatives followed each caption's phrasing; the demo model's first stage was trained on those."""
    rng = random.Random(f"captions-{seed}-{split}")
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    entries = []
    grouped = grouped_scenes(count, seed) if groups and split == "train" else None
    scenes = [(scene, None, "") for scene, _ in grouped] if grouped else split_scenes(split, count, seed)
    for i, (scene, twin, swapped) in enumerate(scenes):
        rel = f"{split}/{i:06d}.png"
        render(scene, size).save(root / "images" / rel)
        texts = captions(scene) if not grouped else _telling_captions(scene, [
            other for other, group in grouped if group == grouped[i][1] and other != scene])
        if split == "train":
            picked = rng.sample(texts, min(CAPTIONS_PER_TRAIN_IMAGE, len(texts)))
            for slot, text in enumerate(picked):
                negatives = false_captions(scene, random.Random(f"negatives-{seed}-{split}-{i}"),
                                           None if scene_negatives else text)
                extra = {"negative_captions": negatives} if negatives else {}
                group = {"group": f"{grouped[i][1]}-{slot}"} if grouped else {}
                entries.append({"image": rel, "caption": text, "image_id": f"{split}_{i}", **extra, **group})
            if with_questions:
                entries += [{"image": rel, "caption": answer, "instruction": question, "image_id": f"{split}_{i}"}
                            for question, answer, _ in questions(scene)]
            continue
        entry = {"image": rel, "caption": texts, "image_id": f"{split}_{i}"}
        if len(scene.things) == 2:  # tests whether a model reads the relation's direction
            entry["mirror_caption"] = mirror_caption(scene)
        if twin is not None:
            entry.update(twin=f"{split}/{twin:06d}.png", swapped=swapped)
        if with_questions:
            entry["questions"] = [{"question": q, "answer": a, "type": t} for q, a, t in questions(scene)]
        entries.append(entry)
    path = root / f"{split}.json"
    path.write_text(json.dumps(entries, indent=0) + "\n", encoding="utf-8")
    return path


def write_dataset(root: Path, seed: int = 0, size: int = 128, sizes: dict[str, int] | None = None,
                  groups: bool = False, with_questions: bool = False, scene_negatives: bool = False) -> None:
    for split, count in (sizes or SPLIT_SIZES).items():
        write_split(root, split, count, seed, size, groups, with_questions, scene_negatives)


# The README's example query, its binding twin (colours swapped) and its mirror (places swapped): all three
# are in the demo folder.
SHOWCASE = (
    Scene((Thing("circle", "red", "large", 0.25, 0.5), Thing("square", "blue", "large", 0.75, 0.48)), "left of"),
    Scene((Thing("circle", "blue", "large", 0.25, 0.5), Thing("square", "red", "large", 0.75, 0.48)), "left of"),
    Scene((Thing("square", "blue", "large", 0.25, 0.5), Thing("circle", "red", "large", 0.75, 0.48)), "left of"),
)


def write_demo_folder(out: Path, count: int = 60, seed: int = 7, size: int = 192) -> None:
    """Pictures only (test-like, with binding twins), named by number: what a user would index.

    The SHOWCASE scenes sit at seeded places among them, so the README's query has its answer and
    its distractors in the folder.
    """
    out.mkdir(parents=True, exist_ok=True)
    scenes = [scene for scene, _, _ in split_scenes("test", max(0, count - len(SHOWCASE)), seed)]
    rng = random.Random(f"demo-{seed}")
    for scene in SHOWCASE[:count]:
        scenes.insert(rng.randint(0, len(scenes)), scene)
    for i, scene in enumerate(scenes):
        render(scene, size).save(out / f"scene-{i:03d}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("dataset", help="train/val/test JSON + images")
    data.add_argument("out", type=Path)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--size", type=int, default=128, help="image side in pixels")
    for split, count in SPLIT_SIZES.items():
        data.add_argument(f"--{split}", type=int, default=count, help=f"{split} images")
    data.add_argument("--groups", action="store_true",
                      help="train split in groups: each scene with its mirror and its binding twin")
    data.add_argument("--questions", action="store_true", help="question/answer pairs too (for InstructBLIP)")
    data.add_argument("--scene-negatives", action="store_true",
                      help="the same caption negatives for every caption of a scene (the demo model's stage 1)")
    demo = sub.add_parser("demo-folder", help="a folder of pictures for `blipsearch index`")
    demo.add_argument("out", type=Path)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--count", type=int, default=60)
    demo.add_argument("--size", type=int, default=192)
    args = parser.parse_args(argv)
    if args.command == "dataset":
        write_dataset(args.out, args.seed, args.size, {s: getattr(args, s) for s in SPLIT_SIZES}, args.groups,
                      args.questions, args.scene_negatives)
    else:
        write_demo_folder(args.out, args.count, args.seed, args.size)


if __name__ == "__main__":
    main()
