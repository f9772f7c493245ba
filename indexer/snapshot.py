"""What a query reads: the index at one generation, in plain files that load without LanceDB.

    snapshot/rows.npz      per image row: content hash, feature segment and slot
    snapshot/recall.faiss  the FAISS recall index over the rows' ITC vectors (see recall.py)
    snapshot/paths.bin     the files' paths, NUL-separated, grouped by image row (paths_rows.npy)
    snapshot/files.npz     per path, in the same order: size in bytes and modification time (ns)
    snapshot/snapshot.json the format version, the manifest generation it mirrors, and the model id (a copy
                           that names the model in the rebuild hint should the manifest be lost)

A snapshot of another format version counts as absent: readers read the tables, and the next indexing
run (which finds no settled snapshot) rewrites it.

An indexing run writes it last (`IndexWriter.finish`); while a run is under way, or after one was
killed, readers build the same picture from the LanceDB tables instead (slower, equally correct).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import durable
from .recall import RecallIndex

if TYPE_CHECKING:
    from .manifest import Identity

FOLDER = "snapshot"
FORMAT = 2  # 2: sizes and modification times of the files


@dataclass
class Snapshot:
    hashes: np.ndarray  # (N,) str: image rows
    segments: np.ndarray  # (N,) int32: feature segment of each row
    slots: np.ndarray  # (N,) int64: record within the segment
    recall: RecallIndex
    path_rows: np.ndarray  # (P,) int64, ascending: the image row of each path
    paths: list[str]  # (P,) in the same order
    sizes: np.ndarray  # (P,) int64 bytes of each file, as indexed
    mtimes_ns: np.ndarray  # (P,) int64 modification time of each file, as indexed
    _row_of: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, hashes: Sequence[str], vectors: np.ndarray, segments: np.ndarray, slots: np.ndarray,
              files: Sequence[tuple[str, str, int, int]]) -> Snapshot:
        """From image rows (hash, (N, V, D) vectors, segment, slot) and file rows (path, hash, size, mtime_ns)."""
        hashes = np.asarray(hashes, dtype=str)
        row_of = {h: i for i, h in enumerate(hashes)}
        rows = sorted((row_of[h], p, size, mtime) for p, h, size, mtime in files if h in row_of)
        column = [np.asarray([r[i] for r in rows], np.int64) for i in (0, 2, 3)]
        return cls(hashes, np.asarray(segments, np.int32), np.asarray(slots, np.int64), RecallIndex.build(vectors),
                   column[0], [r[1] for r in rows], column[1], column[2], row_of)

    def row_of(self, digest: str) -> int | None:
        if not self._row_of:
            self._row_of = {h: i for i, h in enumerate(self.hashes)}
        return self._row_of.get(digest)

    def files_of(self, row: int) -> list[tuple[str, int, int]]:
        """(path, size, mtime_ns) of each file of image `row`."""
        lo, hi = self._span(row)
        return [(self.paths[i], int(self.sizes[i]), int(self.mtimes_ns[i])) for i in range(lo, hi)]

    def _span(self, row: int) -> tuple[int, int]:
        lo, hi = np.searchsorted(self.path_rows, [row, row + 1])
        return int(lo), int(hi)

    def save(self, index_path: Path, generation: int, model_id: str) -> None:
        """Write into a fresh folder, then swap it in: readers see the old snapshot or the new one."""
        folder, tmp = index_path / FOLDER, index_path / (FOLDER + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.savez(tmp / "rows.npz", hashes=self.hashes.astype("S"), segments=self.segments, slots=self.slots)
        np.save(tmp / "paths_rows.npy", self.path_rows)
        np.savez(tmp / "files.npz", sizes=self.sizes, mtimes_ns=self.mtimes_ns)
        (tmp / "paths.bin").write_bytes("\0".join(self.paths).encode("utf-8", "surrogateescape"))
        self.recall.save(tmp)
        meta = {"format": FORMAT, "generation": generation, "images": len(self.hashes), "files": len(self.paths),
                "model": model_id}
        (tmp / "snapshot.json").write_text(json.dumps(meta))
        old = index_path / (FOLDER + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.replace(old)
        durable.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, index_path: Path, generation: int) -> Snapshot | None:
        """The saved snapshot if it mirrors `generation`, else None."""
        folder = index_path / FOLDER
        try:
            if saved_generation(index_path) != generation:
                return None
            with np.load(folder / "rows.npz") as rows:
                hashes, segments, slots = rows["hashes"].astype(str), rows["segments"], rows["slots"]
            path_rows = np.load(folder / "paths_rows.npy")
            with np.load(folder / "files.npz") as files:
                sizes, mtimes = files["sizes"], files["mtimes_ns"]
            text = (folder / "paths.bin").read_bytes().decode("utf-8", "surrogateescape")
            recall = RecallIndex.load(folder)
        except Exception:  # missing, damaged or half-replaced: the tables can always answer instead
            return None
        paths = text.split("\0") if text else []
        if (recall is None or not len(paths) == len(path_rows) == len(sizes) == len(mtimes)
                or not len(hashes) == len(segments) == len(slots)):
            return None
        return cls(hashes, segments, slots, recall, path_rows, paths, sizes, mtimes)


def _meta(index_path: Path) -> dict:
    return json.loads((index_path / FOLDER / "snapshot.json").read_text())


def saved_generation(index_path: Path) -> int | None:
    """The generation the saved snapshot mirrors; None where there is none (deleted, never written, or of
    another format version)."""
    try:
        meta = _meta(index_path)
        return int(meta["generation"]) if meta.get("format") == FORMAT else None
    except Exception:
        return None


def snapshot_model(index_path: Path) -> str | None:
    try:
        return str(_meta(index_path)["model"])
    except Exception:
        return None


def from_tables(images, files, identity: Identity) -> Snapshot:
    """A snapshot of the LanceDB tables as they are now."""
    table = images.to_arrow().select(["hash", "embedding", "segment", "slot"])
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
    vectors = vectors.reshape(-1, identity.vectors_per_image, identity.embed_dim)
    columns = files.to_arrow().select(["path", "hash", "size", "mtime_ns"]).to_pydict().values()
    return Snapshot.build(table.column("hash").to_pylist(), vectors, table.column("segment").to_numpy(),
                          table.column("slot").to_numpy(), list(zip(*columns, strict=True)))
