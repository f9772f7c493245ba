"""First-stage recall: inner product of normalised ITC vectors, with FAISS.

Exact (`IndexFlatIP`) up to `EXACT_LIMIT` vectors, where one query still takes a few milliseconds on
this project's reference machine (see README, Performance); above it an IVF index (nprobe 32) whose
recall we measured against exact search (benchmarks/bench_recall.py).

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
NPROBE = 32


class RecallIndex:
    """Vectors of N images (V per image) in FAISS; `search` answers image rows and ITC scores."""

    def __init__(self, index, vectors_per_image: int, count: int):
        self.index = index
        self.vectors_per_image = vectors_per_image
        self.count = count  # images

    @classmethod
    def build(cls, embeddings: np.ndarray, exact_limit: int = EXACT_LIMIT) -> RecallIndex:
        """(N, V, D) float32 normalised vectors."""
        import faiss

        n, v, d = embeddings.shape
        flat = np.ascontiguousarray(embeddings.reshape(n * v, d), dtype=np.float32)
        if n * v <= exact_limit:
            index = faiss.IndexFlatIP(d)
        else:
            nlist = _nlist(n * v)
            log.info("building an IVF%d recall index over %d vectors", nlist, n * v)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            sample = flat[rng.choice(len(flat), size=min(len(flat), 64 * nlist), replace=False)]
            index.train(sample)
            index.nprobe = NPROBE
        index.add(flat)
        return cls(index, v, n)

    @property
    def exact(self) -> bool:
        return type(self.index).__name__ == "IndexFlatIP"

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
        # with V vectors per image the k best images are among the k*V best vectors
        queries = np.ascontiguousarray(query.reshape(-1, query.shape[-1]), dtype=np.float32)  # (Q, D)
        scores, ids = self.index.search(queries, k * v, params=params)
        order = np.argsort(-scores.ravel(), kind="stable")
        return _best_per_image(ids.ravel()[order], scores.ravel()[order], v, k)

    def save(self, directory: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(directory / "recall.faiss"))
        meta = {"vectors_per_image": self.vectors_per_image, "count": self.count}
        (directory / "recall.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> RecallIndex | None:
        """The index saved in `directory` (memory-mapped), or None where it is missing or unreadable."""
        import faiss

        try:
            meta = json.loads((directory / "recall.json").read_text())
            index = faiss.read_index(str(directory / "recall.faiss"), faiss.IO_FLAG_MMAP)
        except (OSError, ValueError, RuntimeError):
            return None
        if not isinstance(index, faiss.IndexFlatIP):
            faiss.extract_index_ivf(index).nprobe = NPROBE
        return cls(index, meta["vectors_per_image"], meta["count"])


def _nlist(vectors: int) -> int:
    """About 4 sqrt(N) lists, a power of two, as FAISS' guidelines suggest for 1e5..1e7 vectors."""
    return 2 ** round(math.log2(4 * math.sqrt(vectors)))


def _best_per_image(ids: np.ndarray, scores: np.ndarray, v: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    keep = ids >= 0
    rows, scores = ids[keep] // v, scores[keep]
    _, first = np.unique(rows, return_index=True)  # scores are sorted: the first hit is the image's max
    first = np.sort(first)[:k]
    return rows[first], scores[first]
