"""What captions cost at index time with a BLIP-base captioner (ViT-B/16 at 384 px + BERT-base decoder, as
`Salesforce/blip-image-captioning-base`), against encoding the same images for retrieval.

    python benchmarks/bench_caption.py            # ~3 minutes here; random-weight models under --workdir

Random weights (speed does not depend on their values) never end a caption early, so every caption runs
the full 20 decoder steps with 3 beams: an upper bound on what the hub captioner costs. Prints images/s of
both, at batch 16, the captioner's share of an indexing run with captions, and the CPU with its matmul
peak (in the engine's precision on this CPU) measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import DEFAULT_WORKDIR, cpu_model, engine_precision, matmul_peak_gflops, print_json, save_random_blip_base

BATCH = 16


def timed(step, batches: int) -> float:
    step()  # first touches: kernels, caches
    start = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * BATCH / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--batches", type=int, default=2)
    args = parser.parse_args(argv)

    from blipsearch.retrieval.models import load_model
    from blipsearch.retrieval.models.captioner import load_captioner

    retrieval = save_random_blip_base(args.workdir / "blip-base")
    captioner_dir = save_random_blip_base(args.workdir / "blip-base-captioner", "BlipForConditionalGeneration")
    peak = matmul_peak_gflops()
    model = load_model(str(retrieval), device="cpu")
    captioner = load_captioner(str(captioner_dir), device="cpu")
    side = captioner.info.preprocessing.height
    pixels = list(np.random.default_rng(0).integers(0, 255, (BATCH, side, side, 3), dtype=np.uint8))
    encode = timed(lambda: model.encode_images(model.pixel_values(pixels)), args.batches)
    caption = timed(lambda: captioner.caption(pixels), args.batches)
    print_json({"cpu": cpu_model(), "peak_precision": engine_precision(), "matmul_peak_gflops": round(peak),
                "precision": str(captioner.dtype),
                "encode_images_per_s": round(encode, 2), "caption_images_per_s": round(caption, 2),
                "indexing_with_captions_images_per_s": round(1 / (1 / encode + 1 / caption), 2)})


if __name__ == "__main__":
    main()
