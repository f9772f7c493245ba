"""Attribute binding on the scene test split: does a caption pick its own image over its binding twin?

For every twin pair (same layout, one attribute swapped between two things; see scenes.py) and every
caption of one image that the twin does not share, the model scores both images. ITC compares cosines;
re-ranked compares BLIP's fused score (ITM match logit + ITC cosine). Chance is 50%.

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


def evaluate(model, data: Path) -> dict[str, float]:
    pairs = binding_pairs(data / "test.json")
    names = sorted({p[1] for p in pairs} | {p[2] for p in pairs})
    pixels = [load_image(data / "images" / n, model.info.preprocessing).pixels for n in names]
    images = model.encode_images(model.pixel_values(pixels))
    row = {n: i for i, n in enumerate(names)}
    itc_wins = fused_wins = 0
    for caption, own, twin in pairs:
        text = model.encode_texts([caption])
        rows = torch.tensor([row[own], row[twin]])
        itc = images.embeddings[rows, 0] @ text.embeddings[0]  # (2,)
        fused = fuse(itc, model.itm_scores(text.tokens, images.features[rows]))
        itc_wins += int(itc[0] > itc[1])
        fused_wins += int(fused[0] > fused[1])
    n = len(pairs)
    return {"pairs": n, "itc_accuracy": itc_wins / n, "reranked_accuracy": fused_wins / n}


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
