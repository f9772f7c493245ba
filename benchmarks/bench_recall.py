"""First-stage recall: exact FAISS search against the IVF index, by collection size.

    python benchmarks/bench_recall.py            # ~2 minutes here

For each size: milliseconds per single query (the engine searches one query at a time) for exact inner
product (IndexFlatIP) and for the IVF index the engine builds above `EXACT_LIMIT` (indexer/recall.py),
and the IVF's recall of the exact top 64. Vectors are unit vectors of BLIP's 256 dimensions drawn around
many cluster centres (photo collections are clustered; uniformly random vectors would be IVF's worst
case), queries near stored vectors. This is how `EXACT_LIMIT` was chosen: exact while one query costs a
few milliseconds next to the ITM re-rank.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16_384, 65_536, 262_144, 1_048_576])
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    from blipsearch.indexer.recall import RecallIndex

    rng = np.random.default_rng(0)
    print(f"{'vectors':>9}  {'exact ms':>8}  {'IVF ms':>7}  {'IVF recall@64':>13}")
    for n in args.sizes:
        centres = rng.standard_normal((max(n // 100, 1), 256), dtype=np.float32)
        vectors = centres[rng.integers(0, len(centres), n)] / 16 + rng.standard_normal((n, 256), dtype=np.float32) / 64
        vectors = (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True))[:, None, :]
        queries = vectors[rng.choice(n, args.queries), 0] + 0.02 * rng.standard_normal((args.queries, 256))
        queries = (queries / np.linalg.norm(queries, axis=-1, keepdims=True)).astype(np.float32)
        exact = RecallIndex.build(vectors, exact_limit=n)
        ivf = RecallIndex.build(vectors, exact_limit=0)
        exact_ms, truth = _timed(exact, queries)
        ivf_ms, found = _timed(ivf, queries)
        recall = np.mean([len(set(t) & set(f)) / len(t) for t, f in zip(truth, found, strict=True)])
        print(f"{n:>9}  {exact_ms:8.2f}  {ivf_ms:7.2f}  {recall:13.3f}", flush=True)


def _timed(index, queries: np.ndarray) -> tuple[float, list[np.ndarray]]:
    index.search(queries[0], 64)
    start = time.perf_counter()
    results = [index.search(q, 64)[0] for q in queries]
    return 1000 * (time.perf_counter() - start) / len(queries), results


if __name__ == "__main__":
    main()
