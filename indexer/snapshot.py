"""What a query reads: the index at one generation, in plain files that load without LanceDB.

    snapshot/rows.npz      per image row: content hash, feature segment and slot
    snapshot/recall.faiss  the FAISS recall index over the rows' ITC vectors (see recall.py)
    snapshot/paths.bin     the files' paths, NUL-separated, grouped by image row (paths_rows.npy)
    snapshot/files.npz     per path, in the same order: size in bytes, modification time (ns), date (wall-clock
                           seconds: EXIF date taken, else the modification time) and whether it came from EXIF
    snapshot/cameras.bin   per path, NUL-separated: the camera ("" where unknown)
    snapshot/captions.bin  per image row, NUL-separated: its caption ("" where none)
    snapshot/keywords.*    the keyword index over each row's caption and paths (keywords.py)
    snapshot/snapshot.json the format version, the manifest generation it mirrors, and the model id (a copy
                           that names the model in the rebuild hint should the manifest be lost)

On object storage the files lie under snapshot/<generation>/ and snapshot/snapshot.json names the current
one; a reader downloads a generation once into its cache folder (location.py).

A snapshot of another format version counts as absent: readers read the tables, and the next indexing
run (which finds no settled snapshot) rewrites it.

An indexing run writes it last (`IndexWriter.finish`); while a run is under way, or after one was
killed, readers build the same picture from the LanceDB tables instead (slower, equally correct).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .keywords import KeywordIndex
from .location import SNAPSHOT as FOLDER
from .location import Location, location_of
from .recall import RecallIndex

if TYPE_CHECKING:
    from .manifest import Identity

FORMAT = 4  # 2: sizes and modification times of the files; 3: captions, dates, cameras, keywords;
# 4: keywords of up to 64 characters (40 before)


@dataclass
class FileRow:
    """One file as the tables hold it."""

    path: str
    hash: str
    size: int
    mtime_ns: int
    taken: int | None = None  # EXIF wall-clock seconds
    camera: str | None = None


@dataclass
class Snapshot:
    hashes: np.ndarray  # (N,) str: image rows
    segments: np.ndarray  # (N,) int32: feature segment of each row
    slots: np.ndarray  # (N,) int64: record within the segment
    recall: RecallIndex
    captions: list[str]  # (N,) "" where none
    path_rows: np.ndarray  # (P,) int64, ascending: the image row of each path
    paths: list[str]  # (P,) in the same order
    sizes: np.ndarray  # (P,) int64 bytes of each file, as indexed
    mtimes_ns: np.ndarray  # (P,) int64 modification time of each file, as indexed
    dates: np.ndarray  # (P,) int64 wall-clock seconds: EXIF date taken, else the modification time
    exif_dated: np.ndarray  # (P,) bool: `dates` came from EXIF
    cameras: list[str]  # (P,) "" where unknown
    _keywords: KeywordIndex | None = None  # as saved with this generation; else built on first use
    _has_captions: bool | None = None
    _row_of: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, hashes: Sequence[str], vectors: np.ndarray, segments: np.ndarray, slots: np.ndarray,
              captions: Sequence[str | None], files: Sequence[FileRow]) -> Snapshot:
        """From image rows (hash, (N, V, D) vectors, segment, slot, caption) and file rows."""
        from .metadata import local_wall_clock  # here: it brings Pillow, which queries do not need

        hashes = np.asarray(hashes, dtype=str)
        row_of = {h: i for i, h in enumerate(hashes)}
        rows = sorted(((row_of[f.hash], f) for f in files if f.hash in row_of), key=lambda r: (r[0], r[1].path))
        ints = [np.asarray(column, np.int64) for column in (
            [r for r, _ in rows], [f.size for _, f in rows], [f.mtime_ns for _, f in rows],
            [f.taken if f.taken is not None else local_wall_clock(f.mtime_ns) for _, f in rows])]
        return cls(hashes, np.asarray(segments, np.int32), np.asarray(slots, np.int64), RecallIndex.build(vectors),
                   [c or "" for c in captions], ints[0], [f.path for _, f in rows], ints[1], ints[2], ints[3],
                   np.asarray([f.taken is not None for _, f in rows], bool), [f.camera or "" for _, f in rows],
                   _row_of=row_of)

    def row_of(self, digest: str) -> int | None:
        if not self._row_of:
            self._row_of = {h: i for i, h in enumerate(self.hashes)}
        return self._row_of.get(digest)

    def files_of(self, row: int) -> range:
        """Indices (into `paths`, `sizes`, `dates`...) of the files of image `row`."""
        lo, hi = np.searchsorted(self.path_rows, [row, row + 1])
        return range(int(lo), int(hi))

    @property
    def has_captions(self) -> bool:
        if self._has_captions is None:
            self._has_captions = any(self.captions)
        return self._has_captions

    @property
    def keywords(self) -> KeywordIndex:
        """The keyword index over each row's caption and file paths."""
        if self._keywords is None:
            self._keywords = KeywordIndex.build(self.documents())
        return self._keywords

    def documents(self) -> list[str]:
        """Each row's words: its caption, then its paths."""
        words = [[caption] for caption in self.captions]
        for path, row in zip(self.paths, self.path_rows, strict=True):
            words[row].append(path)
        return [" ".join(w) for w in words]

    def save(self, location: Location | Path | str, generation: int, model_id: str) -> None:
        """Make this the snapshot readers find: they see the old snapshot or the new one (location.py)."""
        location_of(location).publish_snapshot(lambda folder: self._write(folder, generation, model_id), generation)

    def _write(self, folder: Path, generation: int, model_id: str) -> None:
        np.savez(folder / "rows.npz", hashes=self.hashes.astype("S"), segments=self.segments, slots=self.slots)
        np.save(folder / "paths_rows.npy", self.path_rows)
        np.savez(folder / "files.npz", sizes=self.sizes, mtimes_ns=self.mtimes_ns, dates=self.dates,
                 exif_dated=self.exif_dated)
        for name, texts in (("paths", self.paths), ("cameras", self.cameras), ("captions", self.captions)):
            (folder / f"{name}.bin").write_bytes("\0".join(texts).encode("utf-8", "surrogateescape"))
        self.recall.save(folder)
        KeywordIndex.build(self.documents()).save(folder)
        meta = {"format": FORMAT, "generation": generation, "images": len(self.hashes), "files": len(self.paths),
                "model": model_id}
        (folder / "snapshot.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, location: Location | Path | str, generation: int) -> Snapshot | None:
        """The saved snapshot if it mirrors `generation`, else None. A remote index's cached copy that does
        not load is downloaded again, once: otherwise every query would read the slower tables for good."""
        location = location_of(location)
        if saved_generation(location) != generation:
            return None
        loaded = cls._read(_folder(location), generation)
        if loaded is None and location.remote:
            loaded = cls._read(_folder(location, refresh=True), generation)
        return loaded

    @classmethod
    def _read(cls, folder: Path | None, generation: int) -> Snapshot | None:
        try:
            if folder is None or json.loads((folder / "snapshot.json").read_text())["generation"] != generation:
                return None
            with np.load(folder / "rows.npz") as rows:
                hashes, segments, slots = rows["hashes"].astype(str), rows["segments"], rows["slots"]
            path_rows = np.load(folder / "paths_rows.npy")
            with np.load(folder / "files.npz") as files:
                sizes, mtimes, dates, exif = (files[k] for k in ("sizes", "mtimes_ns", "dates", "exif_dated"))
            paths, cameras = (_texts(folder / f"{name}.bin", len(path_rows)) for name in ("paths", "cameras"))
            captions = _texts(folder / "captions.bin", len(hashes))
            recall = RecallIndex.load(folder)
            keywords = KeywordIndex.load(folder)  # now, not on first use: a later run may swap the folder
        except Exception:  # missing, damaged or half-replaced: the tables can always answer instead
            return None
        if keywords is None or len(keywords) != len(hashes):
            return None
        if (recall is None or not len(paths) == len(path_rows) == len(sizes) == len(mtimes) == len(dates)
                == len(exif) == len(cameras) or not len(hashes) == len(segments) == len(slots) == len(captions)):
            return None
        return cls(hashes, segments, slots, recall, captions, path_rows, paths, sizes, mtimes, dates, exif, cameras,
                   _keywords=keywords)


def _folder(location: Location, refresh: bool = False) -> Path | None:
    try:
        return location.snapshot_folder(refresh)
    except Exception:  # a remote one that cannot be fetched: the tables answer instead, or say why they cannot
        return None


def _texts(path: Path, count: int) -> list[str]:
    """`count` NUL-separated texts (an empty file is no text, or one empty text)."""
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    return text.split("\0") if text or count == 1 else []


def _meta(location: Location | Path | str) -> dict:
    return json.loads(location_of(location).read_bytes(f"{FOLDER}/snapshot.json"))


def saved_generation(location: Location | Path | str) -> int | None:
    """The generation the saved snapshot mirrors; None where there is none (deleted, never written, or of
    another format version)."""
    try:
        meta = _meta(location)
        return int(meta["generation"]) if meta.get("format") == FORMAT else None
    except Exception:
        return None


def snapshot_model(location: Location | Path | str) -> str | None:
    try:
        return str(_meta(location)["model"])
    except Exception:
        return None


def from_tables(images, files, identity: Identity) -> Snapshot:
    """A snapshot of the LanceDB tables as they are now (tables of an older blipsearch lack some columns).

    Images that no file names are left out: a run removes them only as it finishes, so while one is under way
    (or after one was killed) they would take places in a query's top N and then be dropped, for want of a
    file to show (`--top 3` gave 2 results)."""
    import pyarrow as pa  # here: a query that reads the snapshot files needs none

    rows = files.to_arrow()
    names = [f.name for f in fields(FileRow) if f.name in rows.schema.names]
    file_rows = [FileRow(**row) for row in rows.select(names).to_pylist()]
    table = images.to_arrow()
    named = {f.hash for f in file_rows}
    table = table.filter(pa.array([h in named for h in table.column("hash").to_pylist()], pa.bool_()))
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
    vectors = vectors.reshape(-1, identity.vectors_per_image, identity.embed_dim)
    captions = table.column("caption").to_pylist() if "caption" in table.schema.names else [None] * len(table)
    return Snapshot.build(table.column("hash").to_pylist(), vectors, table.column("segment").to_numpy(),
                          table.column("slot").to_numpy(), captions, file_rows)
