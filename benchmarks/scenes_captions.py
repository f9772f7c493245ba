"""How right a captioner is on the scene test split:
  exact_reference  the caption is one of the scene's reference captions, word for word
  objects_right    it names exactly the scene's objects (size, colour and shape of each, in any order)
  all_right        one- and two-object scenes: objects right and, for two, the relation too, in either
                   direction ("a red circle left of a blue square" = "a blue square right of a red circle")

    python benchmarks/scenes_captions.py --data /tmp/scenes5 --captioner training/demo_captioner
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

OBJECT = re.compile(r"(small|large) (\w+) (circle|square|triangle|diamond)")
_THING = r"((?:small|large) \w+ (?:circle|square|triangle|diamond))"
RELATION = re.compile(_THING + r" (left of|right of|above|below) an? " + _THING)
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _relation(text: str) -> tuple[str, str, str] | None:
    """(thing, relation, thing) of a two-thing caption, in the left-of/above direction; None where none."""
    found = RELATION.search(text)
    if found is None:
        return None
    a, r, b = found.groups()
    return (b, INVERSE[r], a) if r in ("right of", "below") else (a, r, b)


def score(captions: list[str | None], references: list[list[str]]) -> dict[str, float]:
    exact = objects = right = simple = 0
    for caption, refs in zip(captions, references, strict=True):
        caption = caption or ""
        exact += caption in refs
        truth = sorted(OBJECT.findall(refs[0]))
        same = sorted(OBJECT.findall(caption)) == truth
        objects += same
        if len(truth) <= 2:
            simple += 1
            right += same and (len(truth) == 1 or _relation(caption) == _relation(refs[0]))
    return {"exact_reference": round(exact / len(captions), 3), "objects_right": round(objects / len(captions), 3),
            "all_right": round(right / max(1, simple), 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by `scenes.py dataset`")
    parser.add_argument("--captioner", required=True)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args(argv)

    from blipsearch.indexer.images import load_image
    from blipsearch.retrieval.models.captioner import load_captioner

    captioner = load_captioner(args.captioner, device="cpu", precision=args.precision)
    entries = json.loads((args.data / "test.json").read_text())
    pixels = [load_image(args.data / "images" / e["image"], captioner.info.preprocessing).pixels for e in entries]
    captions: list[str | None] = []
    for i in range(0, len(pixels), 16):
        captions += captioner.caption(pixels[i:i + 16])
    result = {"images": len(entries), **score(captions, [e["caption"] for e in entries]),
              "examples": [[c, e["caption"][0]] for c, e in zip(captions[:4], entries, strict=False)]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
