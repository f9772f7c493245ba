"""First-stage recall: inner product of normalised ITC vectors, with FAISS, the index chosen by size.

    up to EXACT_LIMIT vectors   exact (`IndexFlatIP`): one query takes a few milliseconds here
    up to FLAT_LIMIT            IVF-Flat (nprobe 32): 1 KB of RAM per 256-d vector, recall ~1.0
    above                       IVF-PQ (32 bytes per vector), whose top candidates are re-scored by exact
                                cosine from a memory-mapped float16 copy of the vectors (`vectors.f16`),
                                so the scores it returns are exact and its ranking nearly so

The limits and the recall of each tier are measured by benchmarks/bench_recall.py (README, Performance).

Several vectors per image (BLIP-2: 32 queries) are stored as consecutive rows; an image's score is the
maximum over its vectors, as in BLIP-2's ITC.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EXACT_LIMIT = 262_144  # vectors; above this an IVF index answers
FLAT_LIMIT = 4_194_304  # vectors; IVF-Flat holds them all in RAM (4 GB at 256-d), above this IVF-PQ
NPROBE = 32
PQ_BYTES = 32  # PQ sub-quantizers of 8 bits: bytes per vector in the IVF-PQ tier
RESCORE_DEPTH = 8  # the IVF-PQ tier re-scores this many candidates per wanted vector, exactly
VECTORS_FILE = "vectors.f16"  # (N*V, D) float16 row-major, beside an IVF-PQ index


class RecallIndex:
    """Vectors of N images (V per image) in FAISS; `search` answers image rows and ITC scores."""

    def __init__(self, index, vectors_per_image: int, count: int, exact_vectors: np.ndarray | None = None):
        self.index = index
        self.vectors_per_image = vectors_per_image
        self.count = count  # images
        self.exact_vectors = exact_vectors  # (N*V, D) float16, for re-scoring an approximate index's candidates

    @classmethod
    def build(cls, embeddings: np.ndarray, exact_limit: int = EXACT_LIMIT,
              flat_limit: int = FLAT_LIMIT) -> RecallIndex:
        """(N, V, D) float32 normalised vectors."""
        import faiss

        n, v, d = embeddings.shape
        flat = np.ascontiguousarray(embeddings.reshape(n * v, d), dtype=np.float32)
        exact_vectors = None
        if n * v <= exact_limit:
            index = faiss.IndexFlatIP(d)
        else:
            nlist = _nlist(n * v)
            quantizer = faiss.IndexFlatIP(d)
            if n * v <= flat_limit:
                log.info("building an IVF%d,Flat recall index over %d vectors", nlist, n * v)
                index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                log.info("building an IVF%d,PQ%d recall index over %d vectors", nlist, PQ_BYTES, n * v)
                index = faiss.IndexIVFPQ(quantizer, d, nlist, _pq_subquantizers(d), 8, faiss.METRIC_INNER_PRODUCT)
                exact_vectors = flat.astype(np.float16)
            _train(index, flat, nlist)
        index.add(flat)
        return cls(index, v, n, exact_vectors)

    @property
    def exact(self) -> bool:
        return type(self.index).__name__ == "IndexFlatIP"

    @property
    def kind(self) -> str:
        return {"IndexFlatIP": "exact", "IndexIVFFlat": "ivf-flat", "IndexIVFPQ": "ivf-pq"}[type(self.index).__name__]

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k image rows for a (D,) query -> (rows, scores), best first; `allowed` is a row subset.

        A (Q, D) query scores an image by its best vector against the best query vector (an image query
        of BLIP-2's 32 vectors); exact, since an image in the overall top-k is in the top-k of the query
        vector that scores it best.
        """
        import faiss

        v = self.vectors_per_image
        k = min(k, self.count if allowed is None else len(allowed))
        if k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        params = None
        if allowed is not None:
            ids = (allowed[:, None] * v + np.arange(v)[None, :]).ravel().astype(np.int64)
            selector = faiss.IDSelectorBatch(ids)
            # a subset may be scattered over every list: probe them all (exact within the subset)
            params = (faiss.SearchParameters(sel=selector) if self.exact else
                      faiss.SearchParametersIVF(sel=selector, nprobe=faiss.extract_index_ivf(self.index).nlist))
        queries = np.ascontiguousarray(query.reshape(-1, query.shape[-1]), dtype=np.float32)  # (Q, D)
        depth = k * v * (RESCORE_DEPTH if self.exact_vectors is not None else 1)
        # with V vectors per image the k best images are among the k*V best vectors
        scores, ids = self.index.search(queries, depth, params=params)
        if self.exact_vectors is not None:
            scores = self._rescore(queries, ids)
        order = np.argsort(-scores.ravel(), kind="stable")
        return _best_per_image(ids.ravel()[order], scores.ravel()[order], v, k)

    def scores(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact ITC scores of the given image rows (best vector against the best query vector), in order.

        Read straight from the stored vectors where the index keeps them (exact tier, the float16 copy of the
        IVF-PQ tier); the IVF-Flat tier searches the subset instead."""
        v, rows = self.vectors_per_image, np.asarray(rows, np.int64)
        queries = np.ascontiguousarray(query.reshape(-1, query.shape[-1]), dtype=np.float32)  # (Q, D)
        ids = (rows[:, None] * v + np.arange(v)[None, :]).ravel()
        if self.exact_vectors is not None:
            vectors = self.exact_vectors[ids].astype(np.float32)
        elif self.exact:
            vectors = self.index.reconstruct_batch(ids)
        else:
            found, scores = self.search(query, len(rows), rows)
            by_row = dict(zip(found.tolist(), scores.tolist(), strict=True))
            return np.asarray([by_row[r] for r in rows.tolist()], np.float32)
        return (vectors @ queries.T).reshape(len(rows), -1).max(axis=1)

    def _rescore(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact cosines of the (Q, K) candidate vectors, read from the float16 copy (-inf where none)."""
        found = ids >= 0
        scores = np.full(ids.shape, -np.inf, np.float32)
        for row in range(len(queries)):
            rows = ids[row][found[row]]
            scores[row, found[row]] = self.exact_vectors[rows].astype(np.float32) @ queries[row]
        return scores

    def save(self, directory: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(directory / "recall.faiss"))
        meta = {"vectors_per_image": self.vectors_per_image, "count": self.count, "kind": self.kind}
        if self.exact_vectors is not None:
            self.exact_vectors.tofile(directory / VECTORS_FILE)
            meta["dim"] = int(self.exact_vectors.shape[1])
        (directory / "recall.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> RecallIndex | None:
        """The index saved in `directory` (memory-mapped), or None where it is missing or unreadable."""
        import faiss

        try:
            meta = json.loads((directory / "recall.json").read_text())
            index = faiss.read_index(str(directory / "recall.faiss"), faiss.IO_FLAG_MMAP)
            exact_vectors = None
            if "dim" in meta:
                exact_vectors = np.memmap(directory / VECTORS_FILE, np.float16, "r").reshape(-1, meta["dim"])
                if len(exact_vectors) != index.ntotal:
                    return None
        except (OSError, ValueError, RuntimeError, KeyError):
            return None
        if not isinstance(index, faiss.IndexFlatIP):
            faiss.extract_index_ivf(index).nprobe = NPROBE
        return cls(index, meta["vectors_per_image"], meta["count"], exact_vectors)


def _train(index, flat: np.ndarray, nlist: int) -> None:
    rng = np.random.default_rng(0)
    sample = flat[rng.choice(len(flat), size=min(len(flat), 64 * nlist), replace=False)]
    index.train(sample)
    index.nprobe = NPROBE


def _nlist(vectors: int) -> int:
    """About 4 sqrt(N) lists, a power of two, as FAISS' guidelines suggest for 1e5..1e7 vectors."""
    return 2 ** round(math.log2(4 * math.sqrt(vectors)))


def _pq_subquantizers(dim: int) -> int:
    """PQ_BYTES sub-quantizers where they divide the dimension, else the largest divisor below."""
    return max(m for m in range(1, min(PQ_BYTES, dim) + 1) if dim % m == 0)


def _best_per_image(ids: np.ndarray, scores: np.ndarray, v: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    keep = ids >= 0
    rows, scores = ids[keep] // v, scores[keep]
    _, first = np.unique(rows, return_index=True)  # scores are sorted: the first hit is the image's max
    first = np.sort(first)[:k]
    return rows[first], scores[first]
