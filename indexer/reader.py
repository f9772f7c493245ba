"""Reading an index for queries: recall, stored features and paths, from the snapshot files.

Implements the searcher's `CandidateSource`. The snapshot loads without LanceDB, which keeps a fresh
`blipsearch query` process quick; while an indexing run is under way (or after one was killed) the same
view is built from the LanceDB tables.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from blipsearch.retrieval.errors import FieldError, IndexDamagedError, StoreError

from . import codec, snapshot
from .features import SegmentCutShort, needed_records, segments_at
from .layout import FILES, IMAGES, damaged_table, read_index_manifest, tables_pending
from .location import Location, location_of
from .manifest import Manifest
from .scan import is_under

if TYPE_CHECKING:
    from blipsearch.retrieval.search import Filters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileInfo:
    """One file of an image, as indexed."""

    path: str
    size: int  # bytes
    mtime_ns: int
    date: int  # wall-clock seconds: EXIF date taken, else the modification time
    exif_dated: bool  # `date` came from EXIF
    camera: str | None


class IndexReader:
    def __init__(self, path: Location, manifest: Manifest, view: snapshot.Snapshot, from_snapshot: bool):
        self.path = path
        self.manifest = manifest
        self.view = view
        self.from_snapshot = from_snapshot  # False: built from the tables (a run is under way or was killed)
        self._features = segments_at(path, manifest.identity.record_bytes)
        self._allowed: tuple[Filters, np.ndarray | None] | None = None  # the last filters' rows

    @classmethod
    def open(cls, path: Location | Path | str) -> IndexReader:
        """Raises `IndexMissingError` where there is no index, `IndexDamagedError` where it cannot be trusted.

        A local index's feature segments are checked here; a remote one's only as candidates are read (one
        listing of every segment object would cost a query more than its answer)."""
        path = location_of(path)
        manifest = read_index_manifest(path)
        run = manifest.run
        view = None if run.writing else snapshot.Snapshot.load(path, run.generation)
        reader = cls(path, manifest, view or _from_tables(path, manifest), view is not None)
        reader.check_features()
        return reader

    def check_features(self, remote: bool = False) -> None:
        """Raise `IndexDamagedError` where a feature segment this view reads is missing or cut short (a local
        index: one stat per segment; a remote one's only where `remote`, by a fresh listing: a query checks
        only the candidates it reads)."""
        if self.path.remote and not remote:
            return
        segments = segments_at(self.path, self.manifest.identity.record_bytes) if self.path.remote else self._features
        problem = segments.check(needed_records(self.view.segments, self.view.slots))
        if problem:
            raise IndexDamagedError(f"the index at {self.path} is damaged: {problem}; {self.manifest.hint()}")

    def _changed_since_open(self) -> bool:
        """Whether a run began or finished since this view was read (it may have retired segments the view
        reads), as opposed to damage; an unreadable manifest counts as a change (the next open says more)."""
        try:
            run = read_index_manifest(self.path).run
        except StoreError:
            return True
        ours = self.manifest.run
        return (run.build, run.generation, run.writing) != (ours.build, ours.generation, ours.writing)

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

    def recall(self, query: np.ndarray, k: int, where: Filters | None = None) -> list[tuple[str, float]]:
        """Top-k images (hash, ITC cosine) for a (D,) or (Q, D) query (see `RecallIndex.search`), among the
        images that pass `where`."""
        rows, scores = self.view.recall.search(query, k, self.allowed_rows(where))
        return [(str(self.view.hashes[r]), float(s)) for r, s in zip(rows, scores, strict=True)]

    def similarity(self, query: np.ndarray, hashes: Sequence[str]) -> dict[str, float]:
        """ITC cosine of the query with each of the given images (exact)."""
        rows = np.asarray([self.view.row_of(h) for h in hashes], np.int64)
        scores = self.view.recall.scores(query, rows)
        return {str(self.view.hashes[r]): float(s) for r, s in zip(rows, scores, strict=True)}

    def stored_vectors(self, digest: str) -> np.ndarray | None:
        """(V, D) ITC vectors of an indexed image as stored; None where the image is not in this view."""
        row = self.view.row_of(digest)
        return None if row is None else self.view.recall.vectors(np.asarray([row]))[0]

    @property
    def has_captions(self) -> bool:
        return self.view.has_captions

    def keyword_hits(self, text: str, k: int, where: Filters | None = None) -> list[tuple[str, float]]:
        """Top-k images (hash, BM25 score) whose caption or paths hold words of `text`, among those that pass
        `where`."""
        rows, scores = self.view.keywords.search(text, k, self.allowed_rows(where))
        return [(str(self.view.hashes[r]), float(s)) for r, s in zip(rows, scores, strict=True)]

    def allowed_rows(self, where: Filters | None) -> np.ndarray | None:
        """Sorted image rows that pass the filters (None: all): a file in the folders and dates asked for,
        and every `--keyword` word in the row's caption or paths."""
        if where is None or where.empty:
            return None
        if self._allowed is not None and self._allowed[0] is where:  # recall and keyword hits of one query
            return self._allowed[1]
        view, rows = self.view, None
        if where.under is not None or where.after is not None or where.before is not None:
            passing = np.ones(len(view.paths), bool)
            if where.after is not None:
                passing &= view.dates >= where.after
            if where.before is not None:
                passing &= view.dates < where.before
            if where.under is not None:
                passing &= np.fromiter((is_under(p, where.under) for p in view.paths), bool, len(view.paths))
            rows = np.unique(view.path_rows[passing])
        if where.keyword:
            try:
                with_words = view.keywords.rows_with_all(where.keyword)
            except ValueError:
                raise FieldError("keyword", "has no word to search for: give letters or digits") from None
            rows = with_words if rows is None else np.intersect1d(rows, with_words)
        self._allowed = (where, rows)
        return rows

    def passes(self, file: FileInfo, where: Filters | None) -> bool:
        """Whether one file of a result passes the filters on files (folders, dates)."""
        return where is None or ((where.under is None or is_under(file.path, where.under))
                                 and (where.after is None or file.date >= where.after)
                                 and (where.before is None or file.date < where.before))

    def token_features(self, hashes: Sequence[str]) -> np.ndarray:
        """(K, T, H) float32 features of the given images, in the given order."""
        identity = self.manifest.identity
        places = []
        for digest in hashes:
            row = self.view.row_of(digest)
            if row is None:
                raise StoreError(f"image {digest} is not in the index at {self.path}")
            places.append((int(self.view.segments[row]), int(self.view.slots[row])))
        try:
            records = self._features.read_many(places)
        except (OSError, ValueError) as exc:  # SegmentCutShort among them
            if isinstance(exc, SegmentCutShort | FileNotFoundError) and not self._changed_since_open():
                raise IndexDamagedError(f"the index at {self.path} is damaged: {exc}; {self.manifest.hint()}") from exc
            raise StoreError(f"the index at {self.path} changed during the query ({exc}); run it again") from exc
        return codec.unpack_records(records, identity.feature_tokens, identity.feature_dim)

    def paths_by_hash(self, hashes: Sequence[str]) -> dict[str, list[str]]:
        return {h: [file.path for file in files] for h, files in self.files_by_hash(hashes).items()}

    def files_by_hash(self, hashes: Sequence[str]) -> dict[str, list[FileInfo]]:
        """The files of the given images, as indexed."""
        view, out = self.view, {}
        for digest in hashes:
            row = view.row_of(digest)
            out[digest] = [] if row is None else [
                FileInfo(view.paths[i], int(view.sizes[i]), int(view.mtimes_ns[i]), int(view.dates[i]),
                         bool(view.exif_dated[i]), view.cameras[i] or None) for i in view.files_of(row)]
        return out

    def caption_count(self) -> int:
        return sum(1 for caption in self.view.captions if caption)

    def caption(self, digest: str) -> str | None:
        row = self.view.row_of(digest)
        return (self.view.captions[row] or None) if row is not None else None


def _from_tables(path: Location, manifest: Manifest) -> snapshot.Snapshot:
    import lancedb

    why = "a run is under way or was interrupted" if manifest.run.writing else \
        "its snapshot is missing or damaged (the next `blipsearch index` run rewrites it)"
    log.info("index at %s: %s; reading its tables", path, why)
    if tables_pending(path, manifest):
        # a new index whose first run stopped before making its tables (Ctrl-C while the model loaded): empty
        identity = manifest.identity
        return snapshot.Snapshot.build([], np.zeros((0, identity.vectors_per_image, identity.embed_dim), np.float32),
                                       [], [], [], [])
    try:
        db = lancedb.connect(path.lance_uri)
        return snapshot.from_tables(db.open_table(IMAGES), db.open_table(FILES), manifest.identity)
    except Exception as exc:  # LanceDB: ValueError (no table), OSError or RuntimeError (damaged files)
        raise damaged_table(path, manifest, exc) from exc
