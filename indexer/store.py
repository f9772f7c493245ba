"""Writing an index: LanceDB tables of record, feature segments, and the snapshot queries read.

The folder's layout is in layout.py. Files point to images by content hash, so a moved, renamed or
copied file reuses stored features. Every batch is one LanceDB commit: a killed run loses at most the
batch in flight. Storage failures (a full disk, a read-only folder, a damaged table) are one-line
`StoreError`s, and a run that fails leaves the index as after its last whole batch.
"""

from __future__ import annotations

import errno
import functools
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from blipsearch.retrieval.errors import IndexDamagedError, InvalidInputError, StoreError, first_line
from blipsearch.retrieval.models.base import ModelInfo

from . import codec, snapshot
from .features import FeatureSegments, ObjectSegments, needed_records, segments_at
from .layout import (
    FILES,
    IMAGES,
    INDEX_NAMES,
    LOCK,
    check_folder,
    damaged_table,
    has_data,
    pending_tables,
    read_index_manifest,
    tables_pending,
)
from .location import Location, location_of
from .manifest import MANIFEST, Identity, Manifest, check_model, now, read_manifest, recorded_model, write_manifest

log = logging.getLogger(__name__)

T = TypeVar("T")
_IN_CHUNK = 512  # values per SQL IN (...) list
RETIRE_BELOW = 0.5  # a feature segment with less than this share of live records is copied forward
SEGMENT_BYTES = 4 << 30  # runs append to the last segment until it holds this much


# errno -> (what happened, what to do); other errors are named by their own message
_WRITE_FAILURES = {
    errno.ENOSPC: ("the disk is full", "free some space and run again (batches already committed are kept)"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space and run again (batches already committed are kept)"),
    errno.EROFS: ("the file system is read-only", "queries still work; index into a writable --index location"),
    errno.EACCES: ("permission denied", "queries still work; fix the folder's permissions or pick another --index"),
    errno.EPERM: ("permission denied", "queries still work; fix the folder's permissions or pick another --index"),
}


@contextmanager
def _store_errors(path: Location) -> Iterator[None]:
    """OS and LanceDB failures while writing an index become one `StoreError` line.

    What was committed before stays: a run that fails leaves the index as after its last whole batch.
    """
    try:
        yield
    except (OSError, RuntimeError) as exc:
        message = str(exc).lower()
        if isinstance(exc, RuntimeError) and not (message.startswith("lance error") or any(
                words in message for words in ("commit result for version", "s3 error", "object store error"))):
            raise  # not a storage failure (LanceDB's failed commits to object storage say one of those)
        code = exc.errno if isinstance(exc, OSError) else _lance_errno(str(exc))
        what, todo = _WRITE_FAILURES.get(code, (first_line(exc), "run again (batches already committed are "
                                                 "kept); if it fails again, rebuild the index with --rebuild"))
        raise StoreError(f"cannot write the index at {path}: {what}; {todo}") from exc


def _writes(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(self: IndexWriter, *args, **kwargs) -> T:
        self.path.check_writer()  # the LanceDB commits too: a writer whose lock was taken over added rows
        with _store_errors(self.path):
            return method(self, *args, **kwargs)

    return wrapper


def _lance_errno(message: str) -> int | None:
    found = re.search(r"os error (\d+)", message)
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class FileRecord:
    path: str
    size: int
    mtime_ns: int
    hash: str
    taken: int | None = None  # EXIF date taken, wall-clock seconds (see metadata.py)
    camera: str | None = None
    meta: bool | None = None  # the metadata above was read (None: a row from before metadata was kept)


@dataclass
class ImageRecord:
    hash: str
    embedding: np.ndarray  # (V, D) float32, normalised
    features: codec.PackedFeatures
    width: int
    height: int
    caption: str | None = None
    captioner: str | None = None  # the captioner that wrote `caption` (model id and revision)


class IndexWriter:
    """The one process that changes an index. Open with `IndexWriter.open`; `finish`, then `close`."""

    def __init__(self, path: Location, manifest: Manifest, release: Callable[[], None], tables: _Tables,
                 settled: bool = False):
        self.path = path
        self.manifest = manifest
        self._release: Callable[[], None] | None = release  # of the lock
        self._changed = not settled  # a run after a killed one must rewrite the snapshot even if idle
        self.files, self.images = tables.files, tables.images
        self._stored_files, self._known = tables.file_records, tables.hashes  # as read (and checked) at open
        self._captioned = tables.captioned
        self.features = tables.features
        self._segment = manifest.run.current_segment  # this run appends here

    @classmethod
    def open(cls, path: Location | Path | str, info: ModelInfo, rebuild: bool = False) -> IndexWriter:
        """Create the index for `info` if absent; refuse an index of another model unless `rebuild`.

        Everything is checked before the run is flagged as under way (`writing`): a refused or failed
        open leaves a working index as it was.
        """
        path = location_of(path)
        check_folder(path)  # before anything is created in it, the lock included
        with _store_errors(path):
            path.create()
            release = path.lock()
            try:
                if rebuild:
                    _drop(path)  # also what repairs a damaged index
                if not has_data(path) and read_manifest(path) is None:
                    fresh = Manifest.new(info)
                    fresh.run.writing = True  # from its first moment: readers see a run under way, not an empty index
                    write_manifest(path, fresh)  # tables follow in `_Tables.read`
                manifest = read_index_manifest(path)
                check_model(manifest, info, path)
                tables = _Tables.read(path, manifest, create=manifest.run.generation == 0, upgrade=True)
                settled = not manifest.run.writing and manifest.run.generation > 0 and _snapshot_loads(path, manifest)
                _start_run(path, manifest, tables)
                writer = cls(path, manifest, release, tables, settled)
                if tables.rows > len(tables.hashes):  # a `--ray` driver was killed before it removed them
                    writer.drop_duplicate_images()
                return writer
            except BaseException:
                release()
                raise

    def close(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    # ---- what is stored (as read at open) ---------------------------------------------------------

    def file_records(self) -> dict[str, FileRecord]:
        return dict(self._stored_files)

    def known_hashes(self) -> set[str]:
        return set(self._known)

    @_writes
    def remember_captioner(self, name: str | None) -> None:
        """The captioner later runs use by default (None: captions off), recorded at once: a run that is
        killed still leaves the choice for the next."""
        if self.manifest.run.captioner != name:
            self.manifest.run.captioner = name
            write_manifest(self.path, self.manifest)

    def captioned(self) -> dict[str, str]:
        """content hash -> the captioner that wrote its caption, for every content with one."""
        return dict(self._captioned)

    # ---- changes ----------------------------------------------------------------------------------

    @_writes
    def add_images(self, records: Sequence[ImageRecord]) -> None:
        """Features first (durable), then the rows that name them, in one commit."""
        if not records:
            return
        segment, slots = self._append([r.features.record() for r in records])
        self.images.add(self._images_table(records, segment, slots))
        self._known.update(r.hash for r in records)
        self._captioned.update((r.hash, r.captioner) for r in records if r.caption is not None)
        self._changed = True

    @_writes
    def set_captions(self, captions: Sequence[tuple[str, str, str]]) -> None:
        """(content hash, caption, captioner) of stored images, in one commit."""
        if captions:
            hashes, texts, by = (list(column) for column in zip(*captions, strict=True))
            update = pa.table({"hash": hashes, "caption": pa.array(texts, pa.string()),
                               "captioner": pa.array(by, pa.string())})
            self.images.merge_insert("hash").when_matched_update_all().execute(update)
            self._captioned.update(zip(hashes, by, strict=True))
            self._changed = True

    @_writes
    def upsert_files(self, records: Sequence[FileRecord]) -> None:
        if records:
            table = pa.Table.from_pylist([asdict(r) for r in records], schema=FILES_SCHEMA)
            self.files.merge_insert("path").when_matched_update_all().when_not_matched_insert_all() \
                .execute(table)
            self._changed = True

    @_writes
    def delete_files(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        if paths:
            _delete_in(self.files, "path", paths)
            self._changed = True

    @_writes
    def prune_images(self) -> int:
        """Drop images that no file refers to any more; returns how many."""
        referenced = set(self.files.to_arrow().column("hash").to_pylist())
        orphans = [h for h in self._known if h not in referenced]
        if orphans:
            _delete_in(self.images, "hash", orphans)
            self._known.difference_update(orphans)
            for orphan in orphans:
                self._captioned.pop(orphan, None)
            self._changed = True
        return len(orphans)

    @_writes
    def compact(self) -> None:
        """Merge the small fragments that per-batch commits leave (rows only: features live apart)."""
        for table in (self.files, self.images):
            table.optimize(cleanup_older_than=timedelta(minutes=1))

    @_writes
    def finish(self) -> None:
        """After a run: retire sparse feature segments, compact, write the snapshot, bump the generation.

        A run that changed nothing (after one that finished, whose snapshot is in place) only lowers the
        `writing` flag.
        """
        run = self.manifest.run
        if not self._changed:
            run.writing = False
            write_manifest(self.path, self.manifest)
            return
        self._retire_sparse_segments()
        self.compact()
        for table, columns in ((self.files, ("path", "hash")), (self.images, ("hash",))):
            if table.count_rows():  # writes find files by path, readers of the tables look up hashes
                for column in columns:
                    table.create_index(column, config=_btree(), replace=True)
        view = snapshot.from_tables(self.images, self.files, self.manifest.identity)
        view.save(self.path, run.generation + 1, self.manifest.identity.model_id)
        run.generation, run.writing, run.updated = run.generation + 1, False, now()
        write_manifest(self.path, self.manifest)

    # ---- internals --------------------------------------------------------------------------------

    def _retire_sparse_segments(self) -> None:
        """Copy the live records of mostly-dead segments into one segment and retire those files."""
        rows = self.images.to_arrow().select(["hash", "segment", "slot"]).to_pylist()
        live: dict[int, list[dict]] = {}
        for row in rows:
            live.setdefault(row["segment"], []).append(row)
        sparse = [s for s in self.features.segments()
                  if len(live.get(s, [])) < RETIRE_BELOW * self.features.slots(s)]
        if not sparse:
            return
        run = self.manifest.run
        if self._segment in sparse:  # this run's segment is mostly dead too: move on to a fresh one
            self._segment = run.next_segment
            run.current_segment, run.next_segment = self._segment, self._segment + 1
        for segment in sparse:
            for moving in _chunks(live.get(segment, []), 256):  # bounded memory: 256 records at a time
                to, slots = self._append([bytes(b) for b in self.features.read_many(
                    [(segment, r["slot"]) for r in moving])])
                update = pa.table({"hash": [r["hash"] for r in moving],
                                   "segment": pa.array([to] * len(moving), pa.int32()),
                                   "slot": pa.array(slots, pa.int64())})
                self.images.merge_insert("hash").when_matched_update_all().execute(update)
        run.retired_segments = sparse  # deleted by the next run: queries may still read them
        write_manifest(self.path, self.manifest)  # at once: a run killed before `finish` ends still frees them
        log.info("retired %d sparse feature segment(s)", len(sparse))

    def _append(self, records: list[bytes]) -> tuple[int, list[int]]:
        """Store feature records durably: (segment, slots). Segment files take records run after run; on
        object storage each call writes a segment of its own."""
        if not self.features.appendable:
            run = self.manifest.run
            self._segment, run.next_segment = run.next_segment, run.next_segment + 1
            run.current_segment = self._segment
        return self._segment, self.features.append(self._segment, records)

    # ---- writers outside this process (cluster.py) ---------------------------------------------------

    def table_uri(self, name: str) -> str:
        """Where the Lance dataset of a table (`files` or `images`) lies."""
        return f"{self.path.lance_uri.rstrip('/')}/{name}.lance"

    def segments_taken(self, below: int) -> None:
        """Feature segment ids below `below` were used by other writers: this one goes on past them."""
        run = self.manifest.run
        run.next_segment = max(run.next_segment, below)

    @_writes
    def external_commits(self) -> None:
        """Other writers committed rows to the tables: read on from their versions."""
        for table in (self.files, self.images):
            table.checkout_latest()
        rows = self.images.to_arrow().select(["hash", "segment", "slot"])
        self._known = set(rows.column("hash").to_pylist())
        self.features = segments_at(self.path, self.manifest.identity.record_bytes)  # sees their segments
        self.features.start(needed_records(rows.column("segment").to_numpy(), rows.column("slot").to_numpy()))
        self._changed = True

    @_writes
    def drop_duplicate_images(self) -> int:
        """Keep one row per content hash (writers that ran in parallel may each have stored a copy of one new
        content); returns how many rows went."""
        rows = self.images.to_arrow().select(["hash", "segment", "slot"]).to_pylist()
        seen, extra = set(), []
        for row in rows:
            if row["hash"] in seen:
                extra.append(row)
            seen.add(row["hash"])
        for row in extra:
            self.images.delete(f"{_in_list('hash', [row['hash']])} AND segment = {int(row['segment'])} "
                               f"AND slot = {int(row['slot'])}")
        return len(extra)

    def _images_table(self, records: Sequence[ImageRecord], segment: int, slots: list[int]) -> pa.Table:
        width = _embedding_width(self.manifest.identity)
        flat = np.concatenate([r.embedding.astype(np.float32).ravel() for r in records])
        return pa.table({
            "hash": [r.hash for r in records],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat), width),
            "segment": pa.array([segment] * len(records), pa.int32()),
            "slot": pa.array(slots, pa.int64()),
            "width": pa.array([r.width for r in records], pa.int32()),
            "height": pa.array([r.height for r in records], pa.int32()),
            "caption": pa.array([r.caption for r in records], pa.string()),
            "captioner": pa.array([r.captioner for r in records], pa.string()),
        }, schema=images_schema(width))


FILES_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("size", pa.int64()),
    pa.field("mtime_ns", pa.int64()),
    pa.field("hash", pa.string()),
    pa.field("taken", pa.int64()),
    pa.field("camera", pa.string()),
    pa.field("meta", pa.bool_()),
])


def images_schema(width: int) -> pa.Schema:
    return pa.schema([
        pa.field("hash", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), width)),
        pa.field("segment", pa.int32()),
        pa.field("slot", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("caption", pa.string()),
        pa.field("captioner", pa.string()),
    ])


def _embedding_width(identity: Identity) -> int:
    return identity.embed_dim * identity.vectors_per_image


@dataclass
class _Tables:
    """An index's tables, read once and checked against its feature segments."""

    files: Any
    images: Any
    features: FeatureSegments | ObjectSegments
    file_records: dict[str, FileRecord]
    hashes: set[str]
    captioned: dict[str, str]  # hash -> captioner, for the images with a caption
    needed: dict[int, int]  # segment -> records its rows need
    rows: int = 0  # image rows: more than `hashes` where writers in parallel stored one content twice

    @classmethod
    def read(cls, path: Location, manifest: Manifest, create: bool = False, upgrade: bool = False) -> _Tables:
        """Raises `IndexDamagedError` where a table is missing or unreadable, or a segment is short or lost.

        `create`: an index whose first run never finished gets each table that is absent or was never
        completed (its creation cut short: a full disk), as long as the other one holds no row.
        `upgrade`: columns that tables of an older blipsearch lack are added (empty).
        """
        import lancedb

        db = lancedb.connect(path.lance_uri)
        if create:
            _create_missing_tables(db, path, manifest)
        try:
            files, images = db.open_table(FILES), db.open_table(IMAGES)
            if upgrade:
                _add_missing_columns(files, FILES_SCHEMA)
                _add_missing_columns(images, images_schema(_embedding_width(manifest.identity)))
            records = {row["path"]: FileRecord(**row) for row in files.to_arrow().to_pylist()}
            rows = images.to_arrow()
            rows = rows.select([c for c in ("hash", "segment", "slot", "caption", "captioner")
                                if c in rows.schema.names])
        except Exception as exc:  # LanceDB: ValueError (no table), OSError or RuntimeError (damaged files)
            raise damaged_table(path, manifest, exc) from exc
        features = segments_at(path, manifest.identity.record_bytes)
        needed = needed_records(rows.column("segment").to_numpy(), rows.column("slot").to_numpy())
        problem = features.check(needed)
        if problem:
            raise IndexDamagedError(f"the index at {path} is damaged: {problem}; {manifest.hint()}")
        features.start(needed)
        captioned = {}
        if "caption" in rows.schema.names:
            captioned = {row["hash"]: row["captioner"] or "" for row in rows.select(["hash", "caption", "captioner"])
                         .to_pylist() if row["caption"] is not None}
        return cls(files, images, features, records, set(rows.column("hash").to_pylist()), captioned, needed,
                   len(rows))


def _create_missing_tables(db, path: Location, manifest: Manifest) -> None:
    """Make the tables that `pending_tables` names (a table with rows beside a missing one, or one that will
    not open, is damage, which `_Tables.read` reports)."""
    schemas = {FILES: FILES_SCHEMA, IMAGES: images_schema(_embedding_width(manifest.identity))}
    for name in pending_tables(path, manifest):
        log.info("index at %s: creating its %s table", path, name)
        db.create_table(name, schema=schemas[name], mode="overwrite")  # over any half-made one


def _add_missing_columns(table, schema: pa.Schema) -> None:
    """Tables written by an older blipsearch gain the columns they lack, empty (null): captions, file metadata.
    Files without metadata are read once more by the next run (see pipeline.py); nothing is encoded again."""
    present = set(table.schema.names)
    missing = [f for f in schema if f.name not in present]
    if missing:
        table.add_columns(missing)


def _start_run(path: Location, manifest: Manifest, tables: _Tables) -> None:
    """Delete segments retired by the last run, pick the segment to append to, flag the run as under way."""
    run, segments = manifest.run, tables.features
    segments.remove([s for s in run.retired_segments if s not in tables.needed])  # never a live one
    # past every segment there is: a killed run may have written some its manifest never counted
    run.next_segment = max([run.next_segment, *(s + 1 for s in segments.segments())])
    current = run.current_segment
    if current == 0 or segments.slots(current) * segments.record_bytes >= SEGMENT_BYTES:
        current = run.next_segment  # ids are never reused: old snapshots may name old ones
        run.next_segment = current + 1
    run.current_segment, run.retired_segments, run.writing = current, [], True
    write_manifest(path, manifest)  # while `writing`, readers build their view from the tables


def _snapshot_loads(path: Location, manifest: Manifest) -> bool:
    """The saved snapshot mirrors the last run and loads (a local one in full: a damaged file in it would
    otherwise leave every query on the slower tables until some file changed; a remote one by its pointer,
    which is written after its files)."""
    if path.remote:
        return snapshot.saved_generation(path) == manifest.run.generation
    return snapshot.Snapshot.load(path, manifest.run.generation) is not None


def _drop(path: Location) -> None:
    """Delete everything of an index but the lock. The manifest is first marked damaged and goes last, so
    a drop that is cut short leaves an index that asks to be rebuilt, never one that looks healthy."""
    try:
        manifest = read_manifest(path)
    except IndexDamagedError:
        manifest = None  # damaged already: it says so
    if manifest is not None:
        manifest.run.damaged = "a --rebuild is under way, or was interrupted"
        write_manifest(path, manifest)
    for name in sorted(INDEX_NAMES - {LOCK, MANIFEST}):
        path.remove(name)
    path.remove(MANIFEST)


def _btree():
    from lancedb.index import BTree

    return BTree()


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _in_list(column: str, values: Sequence[str]) -> str:
    quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in values)
    return f"{column} IN ({quoted})"


def _delete_in(table, column: str, values: Iterable[str]) -> None:
    for chunk in _chunks(list(values), _IN_CHUNK):
        table.delete(_in_list(column, chunk))


def check_tables(path: Location | Path | str, manifest: Manifest) -> None:
    """Raise `IndexDamagedError` where a table or feature segment of the index is missing or damaged. A new
    index whose first run stopped before making its tables has none yet: the next run makes them."""
    path = location_of(path)
    if not tables_pending(path, manifest):
        _Tables.read(path, manifest)


def model_to_write(path: Location | Path | str, asked: str | None, rebuild: bool) -> str | None:
    """The model an indexing run into `path` should load: `asked`, else the index's own (None: a new index).

    Checks what can be checked before a model is loaded, so that a refused run costs no load.
    """
    path = location_of(path)
    check_folder(path)
    if rebuild:
        recorded = recorded_model(path)
        if asked is None and recorded is None and has_data(path):
            raise InvalidInputError(f"the index at {path} no longer says which model built it; "
                                    "name one to rebuild it with: --rebuild --model MODEL")
        return asked or recorded
    if read_manifest(path) is None and not has_data(path):
        return asked
    return asked or read_index_manifest(path).identity.model_id
