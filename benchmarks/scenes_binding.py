"""Compositional tests on the scene test split, each a two-way choice (chance 50%):

- binding: for every twin pair (same layout, one attribute swapped between two things; see scenes.py)
  and every caption of one image that the twin does not share, does the caption score its own image
  above the twin?
- relation: for every two-thing image, does its first caption score above the same words with the
  things exchanged ("a red circle left of a blue square" vs "a blue square left of a red circle")?

ITC compares cosines; re-ranked compares BLIP's fused score (ITM match logit + ITC cosine).

    python benchmarks/scenes_binding.py --data /tmp/scenes --model training/demo_model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from blipsearch.indexer.images import load_image
from blipsearch.retrieval.fusion import fuse
from blipsearch.retrieval.models import load_model


def binding_pairs(test_json: Path) -> list[tuple[str, str, str]]:
    """(caption, its image, the twin image) for captions that tell the twins apart."""
    entries = {e["image"]: e for e in json.loads(test_json.read_text())}
    pairs = []
    for entry in entries.values():
        if "twin" in entry:
            twin_captions = set(entries[entry["twin"]]["caption"])
            pairs += [(c, entry["image"], entry["twin"]) for c in entry["caption"] if c not in twin_captions]
    return pairs


def _encode(model, data: Path, names: list[str]):
    pixels = [load_image(data / "images" / n, model.info.preprocessing).pixels for n in names]
    return model.encode_images(model.pixel_values(pixels)), {n: i for i, n in enumerate(names)}


def binding(model, data: Path) -> tuple[int, int, int]:
    """(pairs, ITC wins, re-ranked wins): one caption against its image and the binding twin."""
    pairs = binding_pairs(data / "test.json")
    images, row = _encode(model, data, sorted({p[1] for p in pairs} | {p[2] for p in pairs}))
    itc_wins = fused_wins = 0
    for caption, own, twin in pairs:
        text = model.encode_texts([caption])
        rows = torch.tensor([row[own], row[twin]])
        itc = (images.embeddings[rows] @ text.embeddings[0]).amax(-1)  # (2,): best of the V vectors (BLIP-2: 32)
        fused = fuse(itc, model.itm_scores(text.tokens, images.features[rows]))
        itc_wins, fused_wins = itc_wins + int(itc[0] > itc[1]), fused_wins + int(fused[0] > fused[1])
    return len(pairs), itc_wins, fused_wins


def relation(model, data: Path) -> tuple[int, int, int]:
    """(images, ITC wins, re-ranked wins): one image against its caption and the mirrored caption."""
    entries = [e for e in json.loads((data / "test.json").read_text()) if "mirror_caption" in e]
    images, _ = _encode(model, data, [e["image"] for e in entries])
    itc_wins = fused_wins = 0
    for i, entry in enumerate(entries):
        texts = model.encode_texts([entry["caption"][0], entry["mirror_caption"]])
        itc = (texts.embeddings @ images.embeddings[i].T).amax(-1)  # (2,): best of the image's V vectors
        fused = fuse(itc, model.itm_scores(texts.tokens, images.features[i:i + 1].expand(2, -1, -1)))
        itc_wins, fused_wins = itc_wins + int(itc[0] > itc[1]), fused_wins + int(fused[0] > fused[1])
    return len(entries), itc_wins, fused_wins


def evaluate(model, data: Path) -> dict[str, dict[str, float]]:
    out = {}
    for name, test in (("binding", binding), ("relation", relation)):
        n, itc, fused = test(model, data)
        out[name] = {"cases": n, "itc_accuracy": round(itc / n, 4), "reranked_accuracy": round(fused / n, 4)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by `scenes.py dataset`")
    parser.add_argument("--model", required=True)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args(argv)
    model = load_model(args.model, device="cpu", precision=args.precision)
    print(json.dumps(evaluate(model, args.data)))


if __name__ == "__main__":
    main()
