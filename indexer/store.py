"""The index on disk: a LanceDB database of record plus a FAISS recall file.

Layout of an index folder:

    manifest.json   schema version, model id + revision, embedding and feature shapes, preprocessing
    files.lance     one row per indexed file: path, size, mtime_ns, hash
    images.lance    one row per distinct content hash: ITC vectors, packed ITM token features, size
    recall.faiss    FAISS index over images.embedding, with recall.json naming the table version it mirrors
    .lock           held by the one process that writes

Files point to images by content hash, so a moved, renamed or copied file reuses stored features.
Every batch is one LanceDB commit: a killed run loses at most the batch in flight.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
from lancedb.index import BTree

from blipsearch.retrieval.errors import (
    IndexLockedError,
    IndexMissingError,
    InvalidInputError,
    ModelMismatchError,
    StoreError,
)
from blipsearch.retrieval.models.base import ModelInfo

from . import codec
from .recall import RecallIndex
from .scan import is_under

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FILES, IMAGES = "files", "images"
_IN_CHUNK = 512  # values per SQL IN (...) list


def default_location() -> Path:
    """$BLIPSEARCH_INDEX, else the user data folder (e.g. ~/.local/share/blipsearch/index)."""
    if os.environ.get("BLIPSEARCH_INDEX"):
        return Path(os.environ["BLIPSEARCH_INDEX"]).expanduser()
    import platformdirs

    return platformdirs.user_data_path("blipsearch") / "index"


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


def manifest_for(info: ModelInfo) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"id": info.model_id, "revision": info.revision, "family": info.family},
        "embedding": {"dim": info.embed_dim, "vectors_per_image": info.vectors_per_image},
        "features": {"tokens": info.feature_tokens, "dim": info.feature_dim, "codec": codec.CODEC},
        "preprocessing": info.preprocessing.to_dict(),
    }


class Store:
    """Open with `Store.open` (read) or `Store.open_for_writing` (one writer, holds the lock)."""

    def __init__(self, path: Path, manifest: dict, lock_fd: int | None = None):
        import lancedb

        self.path = path
        self.manifest = manifest
        self._lock_fd = lock_fd
        self._db = lancedb.connect(str(path))
        self.files = self._db.open_table(FILES)
        self.images = self._db.open_table(IMAGES)
        self._recall: RecallIndex | None = None
        self._recall_hashes: np.ndarray | None = None

    # ---- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> Store:
        manifest = _read_manifest(path)
        if manifest is None:
            raise IndexMissingError(f"no index at {path}; create one with `blipsearch index FOLDER`")
        return cls(path, manifest)

    @classmethod
    def open_for_writing(cls, path: Path, info: ModelInfo, rebuild: bool = False) -> Store:
        """Create the index for `info` if absent; refuse an index of another model unless `rebuild`."""
        path.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(path)
        try:
            manifest = _read_manifest(path)
            if manifest is not None and rebuild:
                _drop(path)
                manifest = None
            if manifest is None:
                if any(p.name != ".lock" for p in path.iterdir()):
                    raise InvalidInputError(f"{path} is not empty and holds no blipsearch index; "
                                            "choose another --index location")
                manifest = _create(path, info)
            check_model(manifest, info, path)
            return cls(path, manifest, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- writing ---------------------------------------------------------------------------------

    def add_images(self, records: Sequence[ImageRecord]) -> None:
        if records:
            self.images.add(self._images_table(records))

    def upsert_files(self, records: Sequence[FileRecord]) -> None:
        if records:
            table = pa.Table.from_pylist([asdict(r) for r in records], schema=_FILES_SCHEMA)
            self.files.merge_insert("path").when_matched_update_all().when_not_matched_insert_all() \
                .execute(table)

    def delete_files(self, paths: Iterable[str]) -> None:
        _delete_in(self.files, "path", paths)

    def prune_images(self) -> int:
        """Drop images that no file refers to any more; returns how many."""
        referenced = set(self.files.to_arrow().column("hash").to_pylist())
        orphans = [h for h in self.known_hashes() if h not in referenced]
        _delete_in(self.images, "hash", orphans)
        return len(orphans)

    def compact(self) -> None:
        """Merge the small fragments that per-batch commits leave; keep only recent versions."""
        for table in (self.files, self.images):
            table.optimize(cleanup_older_than=timedelta(minutes=1))

    def finish(self) -> None:
        """After a run: compact, index the hash columns, refresh the recall file and the manifest."""
        self.compact()
        for table in (self.files, self.images):
            if table.count_rows():
                table.create_index("hash", config=BTree(), replace=True)
        self.manifest["updated"] = _now()
        _write_json(self.path / MANIFEST, self.manifest)
        self._recall = None
        self._load_recall(save=True)

    # ---- reading ---------------------------------------------------------------------------------

    def file_records(self) -> dict[str, FileRecord]:
        rows = self.files.to_arrow().to_pylist()
        return {row["path"]: FileRecord(**row) for row in rows}

    def known_hashes(self) -> set[str]:
        return set(self.images.to_arrow().select(["hash"]).column("hash").to_pylist())

    def counts(self) -> tuple[int, int]:
        """(files, distinct images)"""
        return self.files.count_rows(), self.images.count_rows()

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def recall(self, query: np.ndarray, k: int, under: Sequence[str] | None = None) -> list[tuple[str, float]]:
        """Top-k images (hash, ITC cosine) for a (D,) query; `under` keeps images with a file in those folders."""
        recall = self._load_recall()
        allowed = None
        if under is not None:
            wanted = {r.hash for r in self.file_records().values() if is_under(r.path, under)}
            allowed = np.flatnonzero(np.isin(self._recall_hashes, list(wanted)))
        rows, scores = recall.search(query, k, allowed)
        return [(str(self._recall_hashes[r]), float(s)) for r, s in zip(rows, scores, strict=True)]

    def token_features(self, hashes: Sequence[str]) -> np.ndarray:
        """(K, T, H) float32 features of the given images, in the given order."""
        spec = self.manifest["features"]
        rows = {}
        for chunk in _chunks(list(hashes), _IN_CHUNK):
            table = self.images.search().where(_in_list("hash", chunk)).limit(len(chunk)) \
                .select(["hash", "features", "feature_scale", "feature_offset"]).to_arrow()
            rows.update({r["hash"]: r for r in table.to_pylist()})
        missing = [h for h in hashes if h not in rows]
        if missing:
            raise StoreError(f"index at {self.path} lost features of {len(missing)} image(s); run "
                             "`blipsearch index` on your folders again to repair it")
        return np.stack([codec.unpack(rows[h]["features"], rows[h]["feature_scale"], rows[h]["feature_offset"],
                                      spec["tokens"], spec["dim"]) for h in hashes])

    def paths_by_hash(self, hashes: Sequence[str]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {h: [] for h in hashes}
        for chunk in _chunks(list(hashes), _IN_CHUNK):
            table = self.files.search().where(_in_list("hash", chunk)).select(["path", "hash"]) \
                .limit(None).to_arrow()
            for row in table.to_pylist():
                found[row["hash"]].append(row["path"])
        return {h: sorted(paths) for h, paths in found.items()}

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """All (hashes (N,), vectors (N, V, D)) in table order."""
        table = self.images.to_arrow().select(["hash", "embedding"])
        spec = self.manifest["embedding"]
        vectors = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
        vectors = vectors.reshape(-1, spec["vectors_per_image"], spec["dim"])
        return np.asarray(table.column("hash").to_pylist(), dtype=object), vectors

    # ---- internals -------------------------------------------------------------------------------

    def _load_recall(self, save: bool = False) -> RecallIndex:
        """The saved FAISS index when it mirrors the current table version, else one rebuilt now."""
        if self._recall is not None:
            return self._recall
        stamp = {"images_version": self.images.version, "schema_version": SCHEMA_VERSION}
        recall = RecallIndex.load(self.path, stamp)
        hashes_file = self.path / "recall_hashes.npy"
        if recall is not None and hashes_file.exists():
            self._recall_hashes = np.load(hashes_file, allow_pickle=False).astype(str)
        else:
            hashes, vectors = self.embeddings()
            recall = RecallIndex.build(vectors)
            self._recall_hashes = hashes.astype(str)
            if save or self._lock_fd is not None:
                np.save(hashes_file, self._recall_hashes.astype("S32"), allow_pickle=False)
                recall.save(self.path, stamp)
        self._recall = recall
        return recall

    def _images_table(self, records: Sequence[ImageRecord]) -> pa.Table:
        spec = self.manifest["embedding"]
        width = spec["dim"] * spec["vectors_per_image"]
        flat = np.concatenate([r.embedding.astype(np.float32).ravel() for r in records])
        return pa.table({
            "hash": [r.hash for r in records],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat), width),
            "features": [r.features.values for r in records],
            "feature_scale": [r.features.scale for r in records],
            "feature_offset": [r.features.offset for r in records],
            "width": pa.array([r.width for r in records], pa.int32()),
            "height": pa.array([r.height for r in records], pa.int32()),
        }, schema=_images_schema(width))


_FILES_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("size", pa.int64()),
    pa.field("mtime_ns", pa.int64()),
    pa.field("hash", pa.string()),
])


def _images_schema(width: int) -> pa.Schema:
    return pa.schema([
        pa.field("hash", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), width)),
        pa.field("features", pa.binary()),
        pa.field("feature_scale", pa.binary()),
        pa.field("feature_offset", pa.binary()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ])


def read_model_id(path: Path) -> str | None:
    """The model an existing index was built with, or None where there is no index."""
    manifest = _read_manifest(path)
    return manifest["model"]["id"] if manifest else None


def check_model(manifest: dict, info: ModelInfo, path: Path) -> None:
    """Refuse vectors from another model, revision or preprocessing than the index holds."""
    if manifest.get("schema_version", 0) > SCHEMA_VERSION:
        raise StoreError(f"index at {path} was written by a newer blipsearch (schema "
                         f"{manifest['schema_version']}); upgrade blipsearch")
    expected = json.loads(json.dumps(manifest_for(info)))  # tuples compare as the lists JSON keeps
    model = manifest["model"]
    same = (model["revision"] == info.revision and manifest["embedding"] == expected["embedding"]
            and manifest["features"] == expected["features"]
            and manifest["preprocessing"] == expected["preprocessing"])
    if not same:
        raise ModelMismatchError(
            f"index at {path} holds vectors of model {model['id']} (revision {model['revision']}), not of "
            f"{info.model_id} (revision {info.revision}); query without --model to use the index's model, "
            "or rebuild it with `blipsearch index --rebuild --model MODEL FOLDER...` (or pick another --index)")


def _create(path: Path, info: ModelInfo) -> dict:
    import lancedb

    manifest = manifest_for(info) | {"created": _now(), "updated": _now()}
    db = lancedb.connect(str(path))
    width = info.embed_dim * info.vectors_per_image
    db.create_table(FILES, schema=_FILES_SCHEMA, exist_ok=True)
    db.create_table(IMAGES, schema=_images_schema(width), exist_ok=True)
    _write_json(path / MANIFEST, manifest)  # last: a folder with a manifest is a complete index
    return _read_manifest(path)


def _drop(path: Path) -> None:
    (path / MANIFEST).unlink()
    for name in (f"{FILES}.lance", f"{IMAGES}.lance"):
        shutil.rmtree(path / name, ignore_errors=True)
    for name in ("recall.faiss", "recall.json", "recall_hashes.npy"):
        (path / name).unlink(missing_ok=True)


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"index manifest {path / MANIFEST} is unreadable ({exc}); "
                         "rebuild with `blipsearch index --rebuild FOLDER`") from exc


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _in_list(column: str, values: Sequence[str]) -> str:
    quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in values)
    return f"{column} IN ({quoted})"


def _delete_in(table, column: str, values: Iterable[str]) -> None:
    for chunk in _chunks(list(values), _IN_CHUNK):
        table.delete(_in_list(column, chunk))
