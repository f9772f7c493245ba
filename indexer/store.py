"""Writing an index: LanceDB tables of record, feature segments, and the snapshot queries read.

Layout of an index folder:

    manifest.json   schema version, model id + revision, shapes, preprocessing, generation
    files.lance     one row per indexed file: path, size, mtime_ns, hash
    images.lance    one row per distinct content: hash, ITC vectors, feature (segment, slot), size
    features/       ITM token features, fixed-size records in append-only segments (features.py)
    snapshot/       what queries read (snapshot.py), rebuilt at the end of each run
    .lock           held by the one process that writes

Files point to images by content hash, so a moved, renamed or copied file reuses stored features.
Every batch is one LanceDB commit: a killed run loses at most the batch in flight.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from blipsearch.retrieval.errors import IndexLockedError, InvalidInputError, StoreError
from blipsearch.retrieval.models.base import ModelInfo

from . import codec, snapshot
from .features import FeatureSegments
from .manifest import (
    MANIFEST,
    check_model,
    manifest_for,
    now,
    read_manifest,
    record_bytes,
    write_manifest,
)

log = logging.getLogger(__name__)

FILES, IMAGES = "files", "images"
_IN_CHUNK = 512  # values per SQL IN (...) list
RETIRE_BELOW = 0.5  # a feature segment with less than this share of live records is copied forward
# Every name an index folder may hold: anything else means the folder is not ours to write or delete.
INDEX_NAMES = frozenset({MANIFEST, MANIFEST + ".tmp", f"{FILES}.lance", f"{IMAGES}.lance", "features", ".lock",
                         snapshot.FOLDER, snapshot.FOLDER + ".tmp", snapshot.FOLDER + ".old"})
SEGMENT_BYTES = 4 << 30  # runs append to the last segment until it holds this much


@dataclass(frozen=True)
class FileRecord:
    path: str
    size: int
    mtime_ns: int
    hash: str


@dataclass
class ImageRecord:
    hash: str
    embedding: np.ndarray  # (V, D) float32, normalised
    features: codec.PackedFeatures
    width: int
    height: int


class IndexWriter:
    """The one process that changes an index. Open with `IndexWriter.open`; `finish`, then `close`."""

    def __init__(self, path: Path, manifest: dict, lock_fd: int, settled: bool = False):
        import lancedb

        self.path = path
        self.manifest = manifest
        self._lock_fd: int | None = lock_fd
        self._changed = not settled  # a run after a killed one must rewrite the snapshot even if idle
        db = lancedb.connect(str(path))
        self.files = db.open_table(FILES)
        self.images = db.open_table(IMAGES)
        self.features = FeatureSegments(path, record_bytes(manifest))
        self._segment = manifest["current_segment"]  # this run appends here

    @classmethod
    def open(cls, path: Path, info: ModelInfo, rebuild: bool = False) -> IndexWriter:
        """Create the index for `info` if absent; refuse an index of another model unless `rebuild`."""
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the index folder {path}: {exc.strerror or exc}") from exc
        lock_fd = _lock(path)
        try:
            if any(p.name not in INDEX_NAMES for p in path.iterdir()):
                raise InvalidInputError(f"{path} holds files that are not a blipsearch index; "
                                        "choose another --index location")
            if rebuild:
                _drop(path)  # also what repairs an index whose manifest is damaged
            manifest = read_manifest(path)
            if manifest is None:  # a new index, or the remains of one whose creation was cut short
                _drop(path)
                manifest = _create(path, info)
            check_model(manifest, info, path)
            settled = manifest.get("writing") is not True and manifest.get("generation", 0) > 0
            _start_run(path, manifest)
            return cls(path, manifest, lock_fd, settled)
        except BaseException:
            os.close(lock_fd)
            raise

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- what is stored ---------------------------------------------------------------------------

    def file_records(self) -> dict[str, FileRecord]:
        return {row["path"]: FileRecord(**row) for row in self.files.to_arrow().to_pylist()}

    def known_hashes(self) -> set[str]:
        return set(self.images.to_arrow().select(["hash"]).column("hash").to_pylist())

    # ---- changes ----------------------------------------------------------------------------------

    def add_images(self, records: Sequence[ImageRecord]) -> None:
        """Features first (durable), then the rows that name them, in one commit."""
        if not records:
            return
        slots = self.features.append(self._segment, [r.features.record() for r in records])
        self.images.add(self._images_table(records, slots))
        self._changed = True

    def upsert_files(self, records: Sequence[FileRecord]) -> None:
        if records:
            table = pa.Table.from_pylist([asdict(r) for r in records], schema=FILES_SCHEMA)
            self.files.merge_insert("path").when_matched_update_all().when_not_matched_insert_all() \
                .execute(table)
            self._changed = True

    def delete_files(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        if paths:
            _delete_in(self.files, "path", paths)
            self._changed = True

    def prune_images(self) -> int:
        """Drop images that no file refers to any more; returns how many."""
        referenced = set(self.files.to_arrow().column("hash").to_pylist())
        orphans = [h for h in self.known_hashes() if h not in referenced]
        if orphans:
            _delete_in(self.images, "hash", orphans)
            self._changed = True
        return len(orphans)

    def compact(self) -> None:
        """Merge the small fragments that per-batch commits leave (rows only: features live apart)."""
        for table in (self.files, self.images):
            table.optimize(cleanup_older_than=timedelta(minutes=1))

    def finish(self) -> None:
        """After a run: retire sparse feature segments, compact, write the snapshot, bump the generation.

        A run that changed nothing (after one that finished) only lowers the `writing` flag.
        """
        if not self._changed:
            self.manifest.update(writing=False)
            write_manifest(self.path, self.manifest)
            return
        self._retire_sparse_segments()
        self.compact()
        for table, columns in ((self.files, ("path", "hash")), (self.images, ("hash",))):
            if table.count_rows():  # writes find files by path, readers of the tables look up hashes
                for column in columns:
                    table.create_index(column, config=_btree(), replace=True)
        generation = self.manifest.get("generation", 0) + 1
        snapshot.from_tables(self.images, self.files, self.manifest).save(self.path, generation)
        self.manifest.update(generation=generation, writing=False, updated=now())
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
        if self._segment in sparse:  # this run's segment is mostly dead too: move on to a fresh one
            self._segment = self.manifest["next_segment"]
            self.manifest.update(current_segment=self._segment, next_segment=self._segment + 1)
        for segment in sparse:
            for moving in _chunks(live.get(segment, []), 256):  # bounded memory: 256 records at a time
                slots = self.features.append(self._segment, [bytes(self.features.read(segment, r["slot"]))
                                                             for r in moving])
                update = pa.table({"hash": [r["hash"] for r in moving],
                                   "segment": pa.array([self._segment] * len(moving), pa.int32()),
                                   "slot": pa.array(slots, pa.int64())})
                self.images.merge_insert("hash").when_matched_update_all().execute(update)
        self.manifest["retired_segments"] = sparse  # deleted by the next run: queries may still read them
        log.info("retired %d sparse feature segment(s)", len(sparse))

    def _images_table(self, records: Sequence[ImageRecord], slots: list[int]) -> pa.Table:
        spec = self.manifest["embedding"]
        width = spec["dim"] * spec["vectors_per_image"]
        flat = np.concatenate([r.embedding.astype(np.float32).ravel() for r in records])
        return pa.table({
            "hash": [r.hash for r in records],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat), width),
            "segment": pa.array([self._segment] * len(records), pa.int32()),
            "slot": pa.array(slots, pa.int64()),
            "width": pa.array([r.width for r in records], pa.int32()),
            "height": pa.array([r.height for r in records], pa.int32()),
        }, schema=images_schema(width))


FILES_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("size", pa.int64()),
    pa.field("mtime_ns", pa.int64()),
    pa.field("hash", pa.string()),
])


def images_schema(width: int) -> pa.Schema:
    return pa.schema([
        pa.field("hash", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), width)),
        pa.field("segment", pa.int32()),
        pa.field("slot", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ])


def _start_run(path: Path, manifest: dict) -> None:
    """Delete segments retired by the last run, pick the segment to append to, flag the run as under way."""
    segments = FeatureSegments(path, record_bytes(manifest))
    segments.remove(manifest.get("retired_segments", []))
    current = manifest.get("current_segment", 0)
    if current == 0 or segments.slots(current) * segments.record_bytes >= SEGMENT_BYTES:
        current = manifest.get("next_segment", 1)  # ids are never reused: old snapshots may name old ones
        manifest["next_segment"] = current + 1
    manifest.update(current_segment=current, retired_segments=[], writing=True)
    write_manifest(path, manifest)  # while `writing`, readers build their view from the tables


def _btree():
    from lancedb.index import BTree

    return BTree()


def _create(path: Path, info: ModelInfo) -> dict:
    import lancedb

    manifest = manifest_for(info) | {"created": now(), "updated": now(), "generation": 0}
    db = lancedb.connect(str(path))
    db.create_table(FILES, schema=FILES_SCHEMA, exist_ok=True)
    db.create_table(IMAGES, schema=images_schema(info.embed_dim * info.vectors_per_image), exist_ok=True)
    write_manifest(path, manifest)  # last: a folder with a manifest is a complete index
    return read_manifest(path)


def _drop(path: Path) -> None:
    """Delete everything of an index but the lock; the manifest goes last, so a cut-short drop is redone."""
    for name in sorted(INDEX_NAMES - {".lock", MANIFEST}):
        target = path / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    (path / MANIFEST).unlink(missing_ok=True)


def _lock(path: Path) -> int:
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass  # no advisory locks on this platform
    except OSError as exc:
        os.close(fd)
        raise IndexLockedError(f"another blipsearch process is writing to the index at {path}; "
                               "wait for it to finish") from exc
    return fd


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _in_list(column: str, values: Sequence[str]) -> str:
    quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in values)
    return f"{column} IN ({quoted})"


def _delete_in(table, column: str, values: Iterable[str]) -> None:
    for chunk in _chunks(list(values), _IN_CHUNK):
        table.delete(_in_list(column, chunk))
