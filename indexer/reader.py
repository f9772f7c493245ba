"""Reading an index for queries: recall, stored features and paths, from the snapshot files.

Implements the searcher's `CandidateSource`. The snapshot loads without LanceDB, which keeps a fresh
`blipsearch query` process quick; while an indexing run is under way (or after one was killed) the same
view is built from the LanceDB tables.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from blipsearch.retrieval.errors import IndexDamagedError, StoreError

from . import codec, snapshot
from .features import FeatureSegments, needed_records
from .layout import FILES, IMAGES, damaged_table, read_index_manifest
from .manifest import Manifest
from .scan import is_under

log = logging.getLogger(__name__)


class IndexReader:
    def __init__(self, path: Path, manifest: Manifest, view: snapshot.Snapshot, from_snapshot: bool):
        self.path = path
        self.manifest = manifest
        self.view = view
        self.from_snapshot = from_snapshot  # False: built from the tables (a run is under way or was killed)
        self._features = FeatureSegments(path, manifest.identity.record_bytes)

    @classmethod
    def open(cls, path: Path) -> IndexReader:
        """Raises `IndexMissingError` where there is no index, `IndexDamagedError` where it cannot be trusted."""
        manifest = read_index_manifest(path)
        run = manifest.run
        view = None if run.writing else snapshot.Snapshot.load(path, run.generation)
        reader = cls(path, manifest, view or _from_tables(path, manifest), view is not None)
        problem = reader._features.check(needed_records(reader.view.segments, reader.view.slots))
        if problem:
            raise IndexDamagedError(f"the index at {path} is damaged: {problem}; {manifest.hint()}")
        return reader

    @property
    def interrupted(self) -> bool:
        """An indexing run is under way, or the last one was killed before it finished."""
        return self.manifest.run.writing

    def counts(self) -> tuple[int, int]:
        """(files, distinct images)"""
        return len(self.view.paths), len(self.view.hashes)

    def files(self) -> dict[str, str]:
        """path -> content hash of every indexed file."""
        return {p: str(self.view.hashes[r]) for p, r in zip(self.view.paths, self.view.path_rows, strict=True)}

    def recall(self, query: np.ndarray, k: int, under: Sequence[str] | None = None) -> list[tuple[str, float]]:
        """Top-k images (hash, ITC cosine) for a (D,) or (Q, D) query (see `RecallIndex.search`); `under` keeps
        images with a file in those folders."""
        allowed = None
        if under is not None:
            inside = [r for p, r in zip(self.view.paths, self.view.path_rows, strict=True) if is_under(p, under)]
            allowed = np.unique(np.asarray(inside, np.int64))
        rows, scores = self.view.recall.search(query, k, allowed)
        return [(str(self.view.hashes[r]), float(s)) for r, s in zip(rows, scores, strict=True)]

    def token_features(self, hashes: Sequence[str]) -> np.ndarray:
        """(K, T, H) float32 features of the given images, in the given order."""
        identity = self.manifest.identity
        maps = []
        for digest in hashes:
            row = self.view.row_of(digest)
            if row is None:
                raise StoreError(f"image {digest} is not in the index at {self.path}")
            try:
                record = self._features.read(int(self.view.segments[row]), int(self.view.slots[row]))
            except (OSError, ValueError) as exc:
                raise StoreError(f"the index at {self.path} changed during the query ({exc}); run it again") from exc
            maps.append(codec.unpack_record(record, identity.feature_tokens, identity.feature_dim))
        return np.stack(maps) if maps else np.empty((0, identity.feature_tokens, identity.feature_dim), np.float32)

    def paths_by_hash(self, hashes: Sequence[str]) -> dict[str, list[str]]:
        return {h: [path for path, _, _ in files] for h, files in self.files_by_hash(hashes).items()}

    def files_by_hash(self, hashes: Sequence[str]) -> dict[str, list[tuple[str, int, int]]]:
        """(path, size, mtime_ns) of each file of the given images, as indexed."""
        return {h: self.view.files_of(row) if (row := self.view.row_of(h)) is not None else [] for h in hashes}


def _from_tables(path: Path, manifest: Manifest) -> snapshot.Snapshot:
    import lancedb

    log.info("index at %s is being written or was interrupted: reading its tables", path)
    try:
        db = lancedb.connect(str(path))
        return snapshot.from_tables(db.open_table(IMAGES), db.open_table(FILES), manifest.identity)
    except Exception as exc:  # LanceDB: ValueError (no table), OSError or RuntimeError (damaged files)
        raise damaged_table(path, manifest, exc) from exc
