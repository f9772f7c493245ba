"""First-stage recall: exact search against the index the engine builds, by size and vectors per image.

    python benchmarks/bench_recall.py                                  # BLIP: 1 vector per image, ~2 minutes
    python benchmarks/bench_recall.py --vectors-per-image 32           # BLIP-2: 32 query vectors per image

For each size: milliseconds per single query (the engine searches one query at a time) for exact inner
product (the engine's exact tier, a numpy scan, up to 1M vectors), and for the index the engine builds at that size
(indexer/recall.py: exact, IVF-Flat, or IVF-PQ with exact re-scoring): its build time, the memory it
keeps, its median latency, and its recall of the exact top 10 and top 64 images (the truth by brute force).

    python benchmarks/bench_recall.py --sizes 1048576 10485760     # 1M and 10M images (~15 GB of RAM)

An image's score is the maximum over its vectors (BLIP-2's ITC); with several vectors per image the script
also measures the alternative layout of one mean-pooled vector per image, whose top candidates are then
re-scored exactly by the max over their vectors ("pooled + rescore").

Vectors are unit vectors of 256 dimensions drawn around many cluster centres (photo collections are
clustered; uniformly random vectors would be IVF's worst case); an image's vectors scatter around its own
centre (BLIP-2's 32 queries of one image are similar but not equal); queries lie near one stored vector.
This is how `EXACT_LIMIT` was chosen (exact while one query costs a few milliseconds next to the ITM
re-rank) and `FLAT_LIMIT` (IVF-Flat while its RAM, 1 KB per vector, stays a few GB). Synthetic data: the
recall figures say how the index layouts compare, not what a real collection of photos gives.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import cpu_model, engine_precision, matmul_peak_gflops

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
    print(f"CPU: {cpu_model()}; {engine_precision()} matmul peak {matmul_peak_gflops():.0f} GFLOP/s; "
          f"{v} vector(s) per image, "
          f"{DIM} dimensions")
    header = (f"{'images':>9} {'vectors':>10}  {'exact ms':>8}  {'engine index':>12}  {'build s':>7}  "
              f"{'MB':>7}  {'p50 ms':>7}  {'R@10':>5}  {'R@64':>5}")
    print(header + (f"  {'pooled ms':>9}  {'pooled R@10':>11}  {'pooled R@64':>11}" if v > 1 else ""))
    rows = [_measure(n, v, args.queries, args.spread, rng) for n in sizes]
    print(json.dumps({"cpu": cpu_model(), "vectors_per_image": v, "spread": args.spread, "rows": rows}))


def _measure(n: int, v: int, queries: int, spread: float, rng: np.random.Generator) -> dict:
    """Exact top-64 by brute force; the index the engine builds at this size: build time, memory, latency,
    recall of the exact top 10 and top 64."""
    from blipsearch.indexer.recall import RecallIndex

    vectors, targets = _collection(n, v, queries, spread, rng)
    truth = [_exact_top(vectors, q, 64) for q in targets]
    exact_ms = None
    if n * v <= 1 << 20:  # a second, flat copy of larger collections would not fit next to the vectors
        exact = RecallIndex.build(vectors, exact_limit=n * v)
        exact_ms = _timed(lambda q: exact.search(q, 64)[0], targets)[0]
        del exact
    started = time.perf_counter()
    engine = RecallIndex.build(vectors)
    build_s = time.perf_counter() - started
    engine_ms, found = _timed(lambda q: engine.search(q, 64)[0], targets, median=True)
    row = {"images": n, "vectors": n * v, "exact_ms": exact_ms, "index": engine.kind, "build_s": build_s,
           "index_mb": _index_mb(engine), "p50_ms": engine_ms, "recall@10": _recall(truth, found, 10),
           "recall@64": _recall(truth, found, 64)}
    exact_text = f"{exact_ms:8.2f}" if exact_ms is not None else f"{'-':>8}"
    line = (f"{n:>9} {n * v:>10}  {exact_text}  {engine.kind:>12}  {build_s:7.1f}  {row['index_mb']:7.0f}  "
            f"{engine_ms:7.2f}  {row['recall@10']:5.3f}  {row['recall@64']:5.3f}")
    if v > 1:
        pooled = RecallIndex.build(vectors.mean(axis=1, keepdims=True), exact_limit=n)
        pooled_ms, rescored = _timed(lambda q: _pooled_then_rescored(pooled, vectors, q, 64), targets)
        row |= {"pooled_ms": pooled_ms, "pooled_recall@10": _recall(truth, rescored, 10),
                "pooled_recall@64": _recall(truth, rescored, 64)}
        line += f"  {pooled_ms:9.2f}  {row['pooled_recall@10']:11.3f}  {row['pooled_recall@64']:11.3f}"
    print(line, flush=True)
    return row


def _exact_top(vectors: np.ndarray, query: np.ndarray, k: int, chunk: int = 1 << 20) -> np.ndarray:
    """Image rows of the k best images by max over their vectors, brute force in chunks (no copy)."""
    n, v, d = vectors.shape
    flat = vectors.reshape(n * v, d)
    best = np.concatenate([flat[i:i + chunk] @ query for i in range(0, n * v, chunk)]).reshape(n, v).max(axis=1)
    top = np.argpartition(-best, k)[:k]
    return top[np.argsort(-best[top], kind="stable")]


def _index_mb(index) -> float:
    """Bytes the index keeps: the exact tier's vectors, or FAISS' serialised size plus the float16 copy an
    IVF-PQ index re-scores from."""
    if index.exact:
        return index.index.nbytes / 2**20
    import faiss

    size = faiss.serialize_index(index.index).nbytes
    if index.exact_vectors is not None:
        size += index.exact_vectors.nbytes
    return size / 2**20


def _collection(n: int, v: int, queries: int, spread: float, rng: np.random.Generator,
                chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """(n, v, D) unit vectors in clusters, made a chunk of images at a time (10M x 256 is 10 GB already),
    and (queries, D) unit queries near stored vectors."""
    centres = rng.standard_normal((max(n // 100, 1), DIM), dtype=np.float32) / 16
    vectors = np.empty((n, v, DIM), np.float32)
    for start in range(0, n, chunk):
        part = vectors[start:start + chunk]
        part[:] = (centres[rng.integers(0, len(centres), len(part))]
                   + rng.standard_normal((len(part), DIM), dtype=np.float32) / 64)[:, None, :]
        if v > 1:  # an image's own vectors scatter around its centre
            part += spread * rng.standard_normal(part.shape, dtype=np.float32)
        part /= np.linalg.norm(part, axis=-1, keepdims=True)
    picked = vectors[rng.choice(n, queries), rng.integers(0, v, queries)]
    targets = picked + 0.02 * rng.standard_normal((queries, DIM))
    return vectors, (targets / np.linalg.norm(targets, axis=-1, keepdims=True)).astype(np.float32)


def _pooled_then_rescored(pooled, vectors: np.ndarray, query: np.ndarray, k: int, depth: int = 4) -> np.ndarray:
    """Top-k by max-over-vectors among the pooled index's top depth*k images."""
    rows, _ = pooled.search(query, depth * k)
    exact = (vectors[rows] @ query).max(axis=1)  # (depth*k,)
    return rows[np.argsort(-exact, kind="stable")[:k]]


def _timed(search, queries: np.ndarray, median: bool = False) -> tuple[float, list[np.ndarray]]:
    """Milliseconds per query (mean, or the median when asked) and the results."""
    search(queries[0])
    times, results = [], []
    for q in queries:
        start = time.perf_counter()
        results.append(search(q))
        times.append(1000 * (time.perf_counter() - start))
    return (float(np.median(times)) if median else float(np.mean(times))), results


def _recall(truth: list[np.ndarray], found: list[np.ndarray], k: int) -> float:
    return float(np.mean([len(set(t[:k]) & set(f[:k])) / len(t[:k]) for t, f in zip(truth, found, strict=True)]))


if __name__ == "__main__":
    main()
