"""First-stage recall: inner product of normalised ITC vectors, the index chosen by size.

    up to EXACT_LIMIT vectors   exact: every vector scanned with numpy's BLAS (saved as FAISS' `IndexFlatIP`
                                file, read without importing FAISS)
    up to FLAT_LIMIT            IVF-Flat (nprobe 32): 1 KB of RAM per 256-d vector, recall ~1.0
    above                       IVF-PQ (32 bytes per vector), whose top candidates are re-scored by exact
                                cosine from a memory-mapped float16 copy of the vectors (`vectors.f16`),
                                so the scores it returns are exact and its ranking nearly so

The limits and the recall of each tier are measured by benchmarks/bench_recall.py (README, Performance).

The exact tier does not go through FAISS at query time: importing it took ~50 ms of every fresh query
process on the 2-core AVX2 EPYC we measure on, more than the scan costs over FAISS' flat search there
(10,000 x 256, one query vector: ~2 ms against 1-21 ms across runs; at EXACT_LIMIT, mapped from the file:
37-49 against 29-40 ms for one query vector, 273-320 against 410-431 ms for 32).

Several vectors per image (BLIP-2: 32 queries) are stored as consecutive rows; an image's score is the
maximum over its vectors, as in BLIP-2's ITC.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EXACT_LIMIT = 262_144  # vectors; above this an IVF index answers
FLAT_LIMIT = 4_194_304  # vectors; IVF-Flat holds them all in RAM (4 GB at 256-d), above this IVF-PQ
NPROBE = 32
PQ_BYTES = 32  # PQ sub-quantizers of 8 bits: bytes per vector in the IVF-PQ tier
RESCORE_DEPTH = 8  # the IVF-PQ tier re-scores this many candidates per wanted vector, exactly
VECTORS_FILE = "vectors.f16"  # (N*V, D) float16 row-major, beside an IVF-PQ index
INDEX_FILE = "recall.faiss"
SCAN_ROWS = 512  # rows per block of the exact tier's scan (a block in float64: 1 MB at 256-d)
SELECT_ROWS = 8192  # rows scanned between selections of the best so far


class RecallIndex:
    """Vectors of N images (V per image); `search` answers image rows and ITC scores."""

    def __init__(self, index, vectors_per_image: int, count: int, exact_vectors: np.ndarray | None = None):
        self.index = index  # the exact tier: its (N*V, D) float32 vectors; else a FAISS IVF index
        self.vectors_per_image = vectors_per_image
        self.count = count  # images
        self.exact_vectors = exact_vectors  # (N*V, D) float16, for re-scoring an approximate index's candidates

    @classmethod
    def build(cls, embeddings: np.ndarray, exact_limit: int = EXACT_LIMIT,
              flat_limit: int = FLAT_LIMIT) -> RecallIndex:
        """(N, V, D) float32 normalised vectors."""
        n, v, d = embeddings.shape
        flat = np.ascontiguousarray(embeddings.reshape(n * v, d), dtype=np.float32)
        if n * v <= exact_limit:
            return cls(flat.copy() if np.shares_memory(flat, embeddings) else flat, v, n)
        import faiss

        nlist = _nlist(n * v)
        quantizer = faiss.IndexFlatIP(d)
        exact_vectors = None
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
        return isinstance(self.index, np.ndarray)

    @property
    def kind(self) -> str:
        if self.exact:
            return "exact"
        return {"IndexIVFFlat": "ivf-flat", "IndexIVFPQ": "ivf-pq"}[type(self.index).__name__]

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k image rows for a (D,) query -> (rows, scores), best first; `allowed` is a row subset.

        A (Q, D) query scores an image by its best vector against the best query vector (an image query
        of BLIP-2's 32 vectors); exact, since an image in the overall top-k is in the top-k of the query
        vector that scores it best.
        """
        v = self.vectors_per_image
        if allowed is not None:
            allowed = self._rows(allowed)
        k = min(k, self.count if allowed is None else len(allowed))
        if k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        queries = np.ascontiguousarray(query.reshape(-1, query.shape[-1]), dtype=np.float32)  # (Q, D)
        # with V vectors per image the k best images are among the k*V best vectors
        ids = None if allowed is None else (allowed[:, None] * v + np.arange(v)[None, :]).ravel().astype(np.int64)
        if self.exact:
            scores, ids = _scan(self.index, queries, k * v, ids)
        else:
            scores, ids = self._search_ivf(queries, k * v, ids)
        order = np.argsort(-scores.ravel(), kind="stable")
        return _best_per_image(ids.ravel()[order], scores.ravel()[order], v, k)

    def _rows(self, rows) -> np.ndarray:
        """Image rows as int64, refused (ValueError) where one lies outside the index: a negative row would
        otherwise read another image's vectors from the end, and FAISS' selectors ignore unknown ids."""
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.count):
            raise ValueError(f"image rows {int(rows.min())}..{int(rows.max())} outside the index's 0..{self.count - 1}")
        return rows

    def _search_ivf(self, queries: np.ndarray, depth: int, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        params = None
        if ids is not None:  # a subset may be scattered over every list: probe them all (exact within it)
            params = faiss.SearchParametersIVF(sel=faiss.IDSelectorBatch(ids),
                                               nprobe=faiss.extract_index_ivf(self.index).nlist)
        depth *= RESCORE_DEPTH if self.exact_vectors is not None else 1
        scores, ids = self.index.search(queries, depth, params=params)
        if self.exact_vectors is not None:
            scores = self._rescore(queries, ids)
        return scores, ids

    def scores(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact ITC scores of the given image rows (best vector against the best query vector), in order.

        Read straight from the stored vectors where the index keeps them (exact tier, the float16 copy of the
        IVF-PQ tier); the IVF-Flat tier searches the subset instead."""
        v, rows = self.vectors_per_image, self._rows(rows)
        queries = np.ascontiguousarray(query.reshape(-1, query.shape[-1]), dtype=np.float32)  # (Q, D)
        ids = (rows[:, None] * v + np.arange(v)[None, :]).ravel()
        if self.exact_vectors is not None:
            vectors = self.exact_vectors[ids].astype(np.float32)
        elif self.exact:
            vectors = np.asarray(self.index[ids], np.float32)
        else:
            found, scores = self.search(query, len(rows), rows)
            by_row = dict(zip(found.tolist(), scores.tolist(), strict=True))
            return np.asarray([by_row[r] for r in rows.tolist()], np.float32)
        return _products(vectors, queries).reshape(len(rows), -1).max(axis=1)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """(n, V, D) float32 stored vectors of the given image rows: the exact tier's, the IVF-PQ tier's
        float16 copy, or the IVF-Flat tier's lists (through an id -> list map made on first use, 8 bytes a
        vector)."""
        v, rows = self.vectors_per_image, self._rows(rows)
        ids = (rows[:, None] * v + np.arange(v)[None, :]).ravel()
        if self.exact_vectors is not None:
            found = self.exact_vectors[ids]
        elif self.exact:
            found = self.index[ids]
        else:
            import faiss

            lists = faiss.extract_index_ivf(self.index)
            if lists.direct_map.type == faiss.DirectMap.NoMap:
                lists.make_direct_map()
            found = self.index.reconstruct_batch(ids)
        return np.asarray(found, np.float32).reshape(len(rows), v, -1)

    def _rescore(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact cosines of the (Q, K) candidate vectors, read from the float16 copy (-inf where none)."""
        found = ids >= 0
        scores = np.full(ids.shape, -np.inf, np.float32)
        for row in range(len(queries)):
            rows = ids[row][found[row]]
            scores[row, found[row]] = self.exact_vectors[rows].astype(np.float32) @ queries[row]
        return scores

    def save(self, directory: Path) -> None:
        """`recall.faiss` (FAISS' own file: the exact tier as an `IndexFlatIP`) and `recall.json`."""
        import faiss

        index = self.index
        if self.exact:
            index = faiss.IndexFlatIP(self.index.shape[1])
            index.add(np.ascontiguousarray(self.index))
        faiss.write_index(index, str(directory / INDEX_FILE))
        meta = {"vectors_per_image": self.vectors_per_image, "count": self.count, "kind": self.kind}
        if self.exact_vectors is not None:
            self.exact_vectors.tofile(directory / VECTORS_FILE)
            meta["dim"] = int(self.exact_vectors.shape[1])
        (directory / "recall.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> RecallIndex | None:
        """The index saved in `directory` (memory-mapped), or None where it is missing or unreadable. The exact
        tier's vectors are mapped straight from the file, without FAISS, where its layout is the one
        `_flat_vectors` knows."""
        try:
            meta = json.loads((directory / "recall.json").read_text())
            index = _flat_vectors(directory / INDEX_FILE) if meta.get("kind") == "exact" else None
            exact_vectors = None
            if index is None:
                import faiss

                index = faiss.read_index(str(directory / INDEX_FILE), faiss.IO_FLAG_MMAP)
                if isinstance(index, faiss.IndexFlatIP):  # a layout `_flat_vectors` does not know
                    index = index.reconstruct_n(0, index.ntotal)
                elif not isinstance(index, faiss.IndexIVF):
                    return None
                else:
                    faiss.extract_index_ivf(index).nprobe = NPROBE
            vectors = len(index) if isinstance(index, np.ndarray) else index.ntotal
            if "dim" in meta:
                exact_vectors = np.memmap(directory / VECTORS_FILE, np.float16, "r").reshape(-1, meta["dim"])
                if len(exact_vectors) != vectors:
                    return None
            if vectors != meta["count"] * meta["vectors_per_image"]:
                return None
            return cls(index, meta["vectors_per_image"], meta["count"], exact_vectors)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError):
            return None


# FAISS' file of an IndexFlatIP as faiss 1.15 writes it (faiss/impl/index_write.cpp; any other layout is
# read through FAISS): "IxFI", d (int32), ntotal (int64), two unused int64, is_trained (uint8), metric
# (int32: 0 is inner product), the vector's length in floats (uint64), then ntotal x d float32, row-major
_FLAT_HEADER = np.dtype([("fourcc", "S4"), ("d", "<i4"), ("ntotal", "<i8"), ("unused", "<i8", 2),
                         ("is_trained", "u1"), ("metric", "<i4"), ("floats", "<u8")])


def _flat_vectors(path: Path) -> np.ndarray | None:
    """The (ntotal, d) float32 vectors of a FAISS `IndexFlatIP` file, memory-mapped (unaligned: the header
    is 45 bytes); None where the file does not have exactly that layout."""
    with open(path, "rb") as f:
        raw = f.read(_FLAT_HEADER.itemsize)
        size = os.fstat(f.fileno()).st_size
    if len(raw) < _FLAT_HEADER.itemsize:
        return None
    header = np.frombuffer(raw, _FLAT_HEADER)[0]
    d, n = int(header["d"]), int(header["ntotal"])
    if (header["fourcc"] != b"IxFI" or d <= 0 or n < 0 or header["metric"] != 0 or header["floats"] != n * d
            or size != _FLAT_HEADER.itemsize + 4 * n * d):
        return None
    if n == 0:
        return np.empty((0, d), np.float32)
    return np.memmap(path, np.float32, "r", offset=_FLAT_HEADER.itemsize, shape=(n, d))


def _scan(vectors: np.ndarray, queries: np.ndarray, depth: int,
          ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search: the (Q, depth) best scores and their vector ids for (Q, D) queries, best
    first, among all vectors or the given ids (valid ones: `RecallIndex.search` checks its rows). Equal scores are
    ordered by id; which of several equal scores at the cut-off is kept is not defined.

    The best so far are kept while the vectors are scanned, SELECT_ROWS at a time, so that memory stays
    (Q, depth + SELECT_ROWS) whatever the index's size (all of its scores at once: ~160 MB for a BLIP-2
    image query of 32 vectors at EXACT_LIMIT)."""
    count = len(vectors) if ids is None else len(ids)
    depth = min(depth, count)
    best_scores = np.empty((len(queries), 0), np.float32)
    best_ids = np.empty((len(queries), 0), np.int64)
    for start in range(0, count, SELECT_ROWS):
        stop = min(start + SELECT_ROWS, count)
        part_ids = np.arange(start, stop) if ids is None else ids[start:stop]
        part = _products(vectors[start:stop] if ids is None else vectors[part_ids], queries).T  # (Q, m)
        scores = np.concatenate([best_scores, part], axis=1)
        found = np.concatenate([best_ids, np.broadcast_to(part_ids.astype(np.int64), part.shape)], axis=1)
        if scores.shape[1] > depth:
            keep = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
            scores, found = np.take_along_axis(scores, keep, axis=1), np.take_along_axis(found, keep, axis=1)
        best_scores, best_ids = scores, found
    order = np.lexsort((best_ids, -best_scores), axis=1)
    return np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_ids, order, axis=1)


def _products(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(n, D) float32 vectors against (Q, D) queries -> (n, Q) float32 inner products, each a function of its
    vector and query alone, not of where the vector lies among the others (an image's score stays the same
    as images come and go, and whichever BLAS computes it): the products are summed in float64, in blocks
    copied into an aligned buffer, and rounded to float32. In float32, BLAS's sums depend on a row's position
    (GEMV's did, by ~4e-7 here) and on its kernels; in float64 such differences lie ~1e-9 of a float32 step
    below where they could change the rounded score."""
    columns = np.ascontiguousarray(queries.T, dtype=np.float64)
    out = np.empty((len(vectors), columns.shape[1]), np.float32)
    block = np.empty((min(SCAN_ROWS, len(vectors)), vectors.shape[1]), np.float64)
    sums = np.empty((len(block), columns.shape[1]), np.float64)
    for start in range(0, len(vectors), SCAN_ROWS):
        part = block[:min(SCAN_ROWS, len(vectors) - start)]
        part[...] = vectors[start:start + len(part)]
        np.matmul(part, columns, out=sums[:len(part)])
        out[start:start + len(part)] = sums[:len(part)]
    return out


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
