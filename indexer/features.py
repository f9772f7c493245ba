"""ITM token features on disk: append-only segment files of fixed-size records, read by memory map.

The feature maps are the bulk of an index (446 KB per image for BLIP ViT-B), so they live beside the
LanceDB tables rather than in them: a LanceDB row names its image's (segment, slot), compaction of the
tables never rewrites feature bytes, and a query reads its candidates' maps with a memory map.

Indexing runs append to the current segment until it holds 4 GiB, then open the next one. A record is
written (and fsynced) before the row that names it is committed, so a killed run leaves at worst
unreferenced bytes. Segments mostly made of records
no row names any more are copied forward and retired; retired files are deleted by the next run, so a
query that started before still finds them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FOLDER = "features"


class FeatureSegments:
    def __init__(self, index_path: Path, record_bytes: int):
        self.folder = index_path / FOLDER
        self.record_bytes = record_bytes
        self._maps: dict[int, np.memmap] = {}

    def _path(self, segment: int) -> Path:
        return self.folder / f"{segment:06d}.bin"

    def segments(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(p.stem) for p in self.folder.glob("*.bin") if p.stem.isdigit())

    def slots(self, segment: int) -> int:
        """Records in a segment (whole ones: a torn tail from a killed run does not count)."""
        try:
            return self._path(segment).stat().st_size // self.record_bytes
        except FileNotFoundError:
            return 0

    def append(self, segment: int, records: Sequence[bytes]) -> list[int]:
        """Write records at the end of `segment` and make them durable; returns their slots."""
        self.folder.mkdir(parents=True, exist_ok=True)
        first = self.slots(segment)
        with open(self._path(segment), "r+b" if self._path(segment).exists() else "wb") as f:
            f.seek(first * self.record_bytes)  # overwrite a torn tail, if any
            for record in records:
                if len(record) != self.record_bytes:
                    raise ValueError(f"feature record of {len(record)} bytes, expected {self.record_bytes}")
                f.write(record)
            f.flush()
            os.fsync(f.fileno())
        self._maps.pop(segment, None)
        return list(range(first, first + len(records)))

    def read(self, segment: int, slot: int) -> memoryview:
        data = self._maps.get(segment)
        if data is None or (slot + 1) * self.record_bytes > len(data):
            data = self._maps[segment] = np.memmap(self._path(segment), dtype=np.uint8, mode="r")
        return memoryview(data[slot * self.record_bytes:(slot + 1) * self.record_bytes])

    def remove(self, segments: Sequence[int]) -> None:
        for segment in segments:
            self._maps.pop(segment, None)
            self._path(segment).unlink(missing_ok=True)
