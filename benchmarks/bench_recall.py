"""First-stage recall: exact FAISS search against the IVF index, by collection size and vectors per image.

    python benchmarks/bench_recall.py                                  # BLIP: 1 vector per image, ~2 minutes
    python benchmarks/bench_recall.py --vectors-per-image 32           # BLIP-2: 32 query vectors per image

For each size: milliseconds per single query (the engine searches one query at a time) for exact inner
product (IndexFlatIP) and for the IVF index the engine builds above `EXACT_LIMIT` vectors
(indexer/recall.py), and the IVF's recall of the exact top 10 and top 64 images. An image's score is the
maximum over its vectors (BLIP-2's ITC); with several vectors per image the script also measures the
alternative layout of one mean-pooled vector per image, whose top candidates are then re-scored exactly
by the max over their vectors ("pooled + rescore").

Vectors are unit vectors of 256 dimensions drawn around many cluster centres (photo collections are
clustered; uniformly random vectors would be IVF's worst case); an image's vectors scatter around its own
centre (BLIP-2's 32 queries of one image are similar but not equal); queries lie near one stored vector.
This is how `EXACT_LIMIT` was chosen: exact while one query costs a few milliseconds next to the ITM
re-rank. Synthetic data: the recall figures say how the index layouts compare, not what a real
collection of photos gives.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import cpu_model

DIM = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="images per collection (default: 16k..1M vectors' worth)")
    parser.add_argument("--vectors-per-image", type=int, default=1)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--spread", type=float, default=1 / 48,
                        help="how far an image's vectors scatter around its centre (per dimension; the image "
                             "centres lie ~1/64 apart within a cluster)")
    args = parser.parse_args()
    v = args.vectors_per_image
    sizes = args.sizes or [n // v for n in (16_384, 65_536, 262_144, 1_048_576)]
    rng = np.random.default_rng(0)
    print(f"CPU: {cpu_model()}; {v} vector(s) per image, {DIM} dimensions")
    header = f"{'images':>8} {'vectors':>9}  {'exact ms':>8}  {'IVF ms':>7}  {'IVF R@10':>8}  {'IVF R@64':>8}"
    print(header + (f"  {'pooled ms':>9}  {'pooled R@10':>11}  {'pooled R@64':>11}" if v > 1 else ""))
    rows = [_measure(n, v, args.queries, args.spread, rng) for n in sizes]
    print(json.dumps({"vectors_per_image": v, "spread": args.spread, "rows": rows}))


def _measure(n: int, v: int, queries: int, spread: float, rng: np.random.Generator) -> dict:
    from blipsearch.indexer.recall import RecallIndex

    vectors, targets = _collection(n, v, queries, spread, rng)
    exact = RecallIndex.build(vectors, exact_limit=n * v)
    ivf = RecallIndex.build(vectors, exact_limit=0)
    exact_ms, truth = _timed(lambda q: exact.search(q, 64)[0], targets)
    ivf_ms, found = _timed(lambda q: ivf.search(q, 64)[0], targets)
    row = {"images": n, "vectors": n * v, "exact_ms": exact_ms, "ivf_ms": ivf_ms,
           "ivf_recall@10": _recall(truth, found, 10), "ivf_recall@64": _recall(truth, found, 64)}
    line = (f"{n:>8} {n * v:>9}  {exact_ms:8.2f}  {ivf_ms:7.2f}  {row['ivf_recall@10']:8.3f}  "
            f"{row['ivf_recall@64']:8.3f}")
    if v > 1:
        pooled = RecallIndex.build(vectors.mean(axis=1, keepdims=True), exact_limit=n)
        pooled_ms, rescored = _timed(lambda q: _pooled_then_rescored(pooled, vectors, q, 64), targets)
        row |= {"pooled_ms": pooled_ms, "pooled_recall@10": _recall(truth, rescored, 10),
                "pooled_recall@64": _recall(truth, rescored, 64)}
        line += f"  {pooled_ms:9.2f}  {row['pooled_recall@10']:11.3f}  {row['pooled_recall@64']:11.3f}"
    print(line, flush=True)
    return row


def _collection(n: int, v: int, queries: int, spread: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, v, D) unit vectors in clusters, and (queries, D) unit queries near stored vectors."""
    centres = rng.standard_normal((max(n // 100, 1), DIM), dtype=np.float32)
    images = centres[rng.integers(0, len(centres), n)] / 16 + rng.standard_normal((n, DIM), dtype=np.float32) / 64
    spread = 0.0 if v == 1 else spread  # an image's own vectors scatter around its centre
    vectors = images[:, None, :] + spread * rng.standard_normal((n, v, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    picked = vectors[rng.choice(n, queries), rng.integers(0, v, queries)]
    targets = picked + 0.02 * rng.standard_normal((queries, DIM))
    return vectors, (targets / np.linalg.norm(targets, axis=-1, keepdims=True)).astype(np.float32)


def _pooled_then_rescored(pooled, vectors: np.ndarray, query: np.ndarray, k: int, depth: int = 4) -> np.ndarray:
    """Top-k by max-over-vectors among the pooled index's top depth*k images."""
    rows, _ = pooled.search(query, depth * k)
    exact = (vectors[rows] @ query).max(axis=1)  # (depth*k,)
    return rows[np.argsort(-exact, kind="stable")[:k]]


def _timed(search, queries: np.ndarray) -> tuple[float, list[np.ndarray]]:
    search(queries[0])
    start = time.perf_counter()
    results = [search(q) for q in queries]
    return 1000 * (time.perf_counter() - start) / len(queries), results


def _recall(truth: list[np.ndarray], found: list[np.ndarray], k: int) -> float:
    return float(np.mean([len(set(t[:k]) & set(f[:k])) / len(t[:k]) for t, f in zip(truth, found, strict=True)]))


if __name__ == "__main__":
    main()
