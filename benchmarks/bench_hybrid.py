"""Hybrid vs vector-only vs keyword-only search on the synthetic scenes, and the captioner's speed.

    python benchmarks/scenes.py dataset /tmp/scenes5 --seed 5        # scenes the demo models never saw
    python benchmarks/bench_hybrid.py --data /tmp/scenes5 --model training/demo_model \
        --captioner training/demo_captioner

Indexes the test split's images with captions written by the captioner, then asks every test caption as a
query and reports text->image recall@1/5/10 of its own image (the papers' protocol: each caption has one
true image) for:
  vector    ITC recall, ITM re-rank of the top --candidates (blipsearch's search without keywords)
  keyword   BM25 over the written captions and the file paths alone
  hybrid    vector and keyword lists fused by reciprocal rank, then the same ITM re-rank
Also times the captioner alone on the test images (images/s, batch 16) and prints the CPU and its matmul
peak (in the engine's precision on this CPU) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import cpu_model, engine_precision, matmul_peak_gflops, print_json

KS = (1, 5, 10)


def caption_speed(captioner, paths: list[Path], batch: int = 16) -> float:
    from blipsearch.indexer.images import load_image

    pixels = [load_image(p, captioner.info.preprocessing).pixels for p in paths]
    captioner.caption(pixels[:batch])  # first touches
    start = time.perf_counter()
    for i in range(0, len(pixels), batch):
        captioner.caption(pixels[i:i + batch])
    return len(pixels) / (time.perf_counter() - start)


def build_index(images: Path, index: Path, model_name: str, captioner_name: str) -> tuple[object, float]:
    from blipsearch.indexer.pipeline import CaptionerSource, IndexOptions, index_folders
    from blipsearch.indexer.store import IndexWriter
    from blipsearch.retrieval.models import load_model
    from blipsearch.retrieval.models.captioner import load_captioner

    model = load_model(model_name, device="cpu")
    captioner = load_captioner(captioner_name, device="cpu")
    store = IndexWriter.open(index, model.info)
    try:
        source = CaptionerSource(captioner_name, lambda: captioner)
        index_folders([images], model, store, IndexOptions(progress=False, captioner=source))
    finally:
        store.close()
    return captioner, model


def recall(ranks: list[int | None]) -> dict[str, float]:
    """Recall@k in percent from the 0-based rank of each query's image (None: not in the list)."""
    return {f"R@{k}": round(100 * sum(r is not None and r < k for r in ranks) / len(ranks), 1) for k in KS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by `scenes.py dataset`")
    parser.add_argument("--model", required=True)
    parser.add_argument("--captioner", required=True)
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="first N test images only")
    args = parser.parse_args(argv)

    from blipsearch.retrieval.api import Index, Options

    entries = json.loads((args.data / "test.json").read_text())[:args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        for entry in entries:  # only the test images: links, so the index's paths say nothing of the scene
            (images / Path(entry["image"]).name).symlink_to((args.data / "images" / entry["image"]).resolve())
        peak = matmul_peak_gflops()
        start = time.perf_counter()
        captioner, _ = build_index(images, Path(tmp) / "index", args.model, args.captioner)
        index_seconds = time.perf_counter() - start
        speed = caption_speed(captioner, sorted(images.iterdir()))
        index = Index.open(Path(tmp) / "index", args.model, device="cpu")
        reader = index.reader
        path_of = {Path(e["image"]).name: str(images / Path(e["image"]).name) for e in entries}
        ranks: dict[str, list[int | None]] = {"vector": [], "hybrid": [], "keyword": []}
        for entry in entries:
            target = path_of[Path(entry["image"]).name]
            for caption in entry["caption"]:
                for mode, hybrid in (("vector", False), ("hybrid", True)):
                    found = [r.path for r in index.search(caption, Options(top=10, candidates=args.candidates,
                                                                           hybrid=hybrid))]
                    ranks[mode].append(found.index(target) if target in found else None)
                hits = [reader.paths_by_hash([key])[key][0] for key, _ in reader.keyword_hits(caption, 10)]
                ranks["keyword"].append(hits.index(target) if target in hits else None)
        captions = [reader.caption(h) for h in reader.files().values()]
        sample = sorted({c for c in captions if c})[:3]
    print_json({
        "cpu": cpu_model(), "peak_precision": engine_precision(), "matmul_peak_gflops": round(peak),
        "images": len(entries),
        "queries": len(ranks["vector"]), "candidates": args.candidates,
        "recall": {mode: recall(r) for mode, r in ranks.items()},
        "captioner_images_per_s": round(speed, 1), "index_with_captions_s": round(index_seconds, 1),
        "sample_captions": sample,
    })


if __name__ == "__main__":
    main()
