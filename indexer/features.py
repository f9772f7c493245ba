"""ITM token features on disk: append-only segment files of fixed-size records, read by memory map.

The feature maps are the bulk of an index (446 KB per image for BLIP ViT-B), so they live beside the
LanceDB tables rather than in them: a LanceDB row names its image's (segment, slot), compaction of the
tables never rewrites feature bytes, and a query reads its candidates' maps with a memory map.

Indexing runs append to the current segment until it holds 4 GiB, then open the next one. A record is
written (and fsynced) before the row that names it is committed, so a killed run leaves at worst
unreferenced bytes. Segments mostly made of records no row names any more are copied forward and
retired; retired files are deleted by the next run, so a query that started before still finds them.

Slots come from the rows: a writer starts each segment one past the highest slot its rows name (or past
the file's last whole record where that is further: records a killed run or a pruned image left, which
an older snapshot may still name), and before that `check` has made sure every segment is as long as its
rows need. A file that was cut short or lost is therefore reported, never written over.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

FOLDER = "features"


class FeatureSegments:
    def __init__(self, index_path: Path, record_bytes: int):
        self.folder = index_path / FOLDER
        self.record_bytes = record_bytes
        self._maps: dict[int, np.memmap] = {}
        self._next: dict[int, int] = {}  # segment -> next free slot, for segments this writer appends to

    def _path(self, segment: int) -> Path:
        return self.folder / f"{segment:06d}.bin"

    def segments(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(p.stem) for p in self.folder.glob("*.bin") if p.stem.isdigit())

    def slots(self, segment: int) -> int:
        """Whole records in a segment file (a torn tail from a killed run does not count)."""
        try:
            return self._path(segment).stat().st_size // self.record_bytes
        except FileNotFoundError:
            return 0

    def check(self, needed: Mapping[int, int]) -> str | None:
        """What is wrong, if anything, given the records each segment's rows need (segment -> highest slot + 1)."""
        for segment, count in sorted(needed.items()):
            path = self._path(segment)
            if not path.is_file():
                return f"feature segment {path} is missing ({count} stored images need it)"
            if self.slots(segment) < count:
                return (f"feature segment {path} holds {self.slots(segment)} records, "
                        f"but its rows need {count}: it was cut short")
        return None

    def start(self, needed: Mapping[int, int]) -> None:
        """Before appending: where each segment's next record goes (call after `check` passed)."""
        self._next = {s: max(count, self.slots(s)) for s, count in needed.items()}

    def append(self, segment: int, records: Sequence[bytes]) -> list[int]:
        """Write records at the segment's next free slot and make them durable; returns their slots."""
        for record in records:
            if len(record) != self.record_bytes:
                raise ValueError(f"feature record of {len(record)} bytes, expected {self.record_bytes}")
        self.folder.mkdir(parents=True, exist_ok=True)
        first = self._next.get(segment)
        if first is None:  # a segment no row names yet
            first = self.slots(segment)
        with open(self._path(segment), "r+b" if self._path(segment).exists() else "wb") as f:
            f.seek(first * self.record_bytes)  # past every live record; over a torn tail, if any
            f.write(b"".join(records))
            f.flush()
            os.fsync(f.fileno())
        self._next[segment] = first + len(records)
        self._maps.pop(segment, None)
        return list(range(first, first + len(records)))

    def read(self, segment: int, slot: int) -> memoryview:
        data = self._maps.get(segment)
        if data is None or (slot + 1) * self.record_bytes > len(data):
            data = self._maps[segment] = np.memmap(self._path(segment), dtype=np.uint8, mode="r")
        if (slot + 1) * self.record_bytes > len(data):
            raise ValueError(f"feature segment {self._path(segment)} has no record {slot}")
        return memoryview(data[slot * self.record_bytes:(slot + 1) * self.record_bytes])

    def remove(self, segments: Sequence[int]) -> None:
        for segment in segments:
            self._maps.pop(segment, None)
            self._next.pop(segment, None)
            self._path(segment).unlink(missing_ok=True)


def needed_records(segments: np.ndarray, slots: np.ndarray) -> dict[int, int]:
    """segment -> highest slot named + 1, from the (segment, slot) of every image row."""
    if len(segments) == 0:
        return {}
    segments, slots = np.asarray(segments, np.int64), np.asarray(slots, np.int64)
    order = np.lexsort((slots, segments))
    last = np.r_[np.flatnonzero(np.diff(segments[order])), len(order) - 1]  # last row of each segment
    return {int(segments[order][i]): int(slots[order][i]) + 1 for i in last}
