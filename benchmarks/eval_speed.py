"""Per-stage speed of `blipsearch eval` at full BLIP ViT-B size, and what a full Flickr30k / COCO run costs.

Hub weights are not needed: a randomly initialised BLIP with the shapes of `blip-itm-base-coco` (ViT-B/16 at
384 px, 577 x 768 features, BERT-base text encoder) costs the same FLOPs as the trained one. The script draws
a few synthetic pictures with captions, runs the evaluation protocol through the same `evaluate` the
command uses, and extrapolates the measured rates to the two test sets with their default k_test.

    python benchmarks/eval_speed.py --images 16 --k-test 8 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

# Full test sets: images, captions, default BLIP k_test (LAVIS).
FULL_SETS = {"flickr30k": (1000, 5000, 128), "coco": (5000, 25010, 256)}
WORDS = ("red", "green", "blue", "circle", "square", "dog", "cat", "beach", "tree", "house", "car", "sky")


def save_random_blip_base(directory: Path) -> Path:
    """A random BLIP with blip-itm-base-coco's shapes (transformers' BlipConfig defaults, but 12 text heads as
    the released checkpoints have: BlipTextConfig's default is 8), saved by path."""
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny import save_processor, save_tokenizer  # the word-level test tokenizer: its vocabulary size is moot

    tokenizer, _ = save_tokenizer(directory)
    config = transformers.BlipConfig(text_config={"bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
                                                  "num_attention_heads": 12})
    torch.manual_seed(0)
    transformers.BlipForImageTextRetrieval(config).eval().save_pretrained(directory)
    save_processor(directory, tokenizer, config.vision_config.image_size)
    return directory


def write_dataset(root: Path, images: int, captions: int = 5) -> Path:
    """`images` 640x480 JPEGs with `captions` 10-word captions each, as a LAVIS test list."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(images):
        picture = Image.new("RGB", (640, 480), (40 * i % 256, 90, 160))
        ImageDraw.Draw(picture).ellipse((100 + i, 80, 400, 380), fill=(200, 30 * i % 256, 40))
        picture.save(root / "images" / f"{i:05d}.jpg", quality=90)
        text = [" ".join(WORDS[(i + j + w) % len(WORDS)] for w in range(10)) for j in range(captions)]
        entries.append({"image": f"{i:05d}.jpg", "caption": text})
    ann = root / "test.json"
    ann.write_text(json.dumps(entries))
    return ann


def extrapolate(seconds: dict[str, float], images: int, texts: int, pairs: int) -> dict[str, float]:
    """Hours for each full test set at the measured per-image, per-caption and per-pair rates."""
    out = {}
    for name, (n_images, n_texts, k_test) in FULL_SETS.items():
        full_pairs = (n_images + n_texts) * k_test
        out[name] = (seconds["image_encoding"] / images * n_images + seconds["text_encoding"] / texts * n_texts
                     + seconds["itm"] / pairs * full_pairs) / 3600
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--k-test", type=int, default=8)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--itm-batch", type=int, default=64)
    args = parser.parse_args()

    from blipsearch.retrieval.annotations import load_annotations
    from blipsearch.retrieval.evaluation import EvalOptions, evaluate
    from blipsearch.retrieval.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = load_model(str(save_random_blip_base(tmp / "model")), args.device, args.precision)
        items = load_annotations(write_dataset(tmp / "data", args.images))
        options = EvalOptions(k_test=args.k_test, image_batch=8, itm_batch=args.itm_batch)
        evaluate(model, items[:2], tmp / "data" / "images", EvalOptions(k_test=2))  # warm-up
        result = evaluate(model, items, tmp / "data" / "images", options)
    report = {
        "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "images": result.images, "texts": result.texts, "k_test": args.k_test,
        "seconds": {k: round(v, 2) for k, v in result.seconds.items()},
        "images_per_s": round(result.images / result.seconds["image_encoding"], 2),
        "captions_per_s": round(result.texts / result.seconds["text_encoding"], 1),
        "itm_pairs": result.itm_pairs, "itm_pairs_per_s": round(result.itm_pairs_per_second, 1),
        "full_run_hours": {k: round(v, 1) for k, v in
                           extrapolate(result.seconds, result.images, result.texts, result.itm_pairs).items()},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
