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

On object storage (`ObjectSegments`) nothing can be appended to: every commit writes its records as a new
segment object, named once and never written again; reads are ranged GETs, run in parallel.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .location import Location, ObjectPrefix

FOLDER = "features"


def segments_at(location: Location, record_bytes: int) -> FeatureSegments | ObjectSegments:
    if isinstance(location, ObjectPrefix):
        return ObjectSegments(location, record_bytes)
    return FeatureSegments(location.path, record_bytes)


class SegmentCutShort(ValueError):
    """A feature segment no longer holds a record that rows name."""


class FeatureSegments:
    appendable = True  # a commit may add records to a segment that holds some already

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

    def read_many(self, places: Sequence[tuple[int, int]]) -> list[memoryview]:
        """The records at the given (segment, slot) places, in order. Each segment's file is first checked
        to still hold them: reading a mapped file past its end ends the process (SIGBUS), and a file cut
        short in place (outside damage: runs only append) would otherwise take a server down with it."""
        needed: dict[int, int] = {}
        for segment, slot in places:
            needed[segment] = max(needed.get(segment, 0), slot + 1)
        for segment, count in needed.items():
            held = self.slots(segment)
            if held < count and self._path(segment).exists():  # gone (a later run retired it): `read` says so
                raise SegmentCutShort(f"feature segment {self._path(segment)} holds {held} records, but "
                                      f"the query needs {count}: it was cut short")
        return [self.read(segment, slot) for segment, slot in places]

    def remove(self, segments: Sequence[int]) -> None:
        for segment in segments:
            self._maps.pop(segment, None)
            self._next.pop(segment, None)
            self._path(segment).unlink(missing_ok=True)


class ObjectSegments:
    """Feature segments as objects (features/NNNNNN.bin), each written once by one commit."""

    appendable = False  # each commit writes a segment of its own

    def __init__(self, location: ObjectPrefix, record_bytes: int):
        self.location = location
        self.record_bytes = record_bytes
        self._sizes: dict[int, int] | None = None  # segment -> bytes, listed once

    def _name(self, segment: int) -> str:
        return f"{FOLDER}/{segment:06d}.bin"

    @property
    def sizes(self) -> dict[int, int]:
        if self._sizes is None:
            listed = self.location.listing(FOLDER + "/")
            self._sizes = {int(name[len(FOLDER) + 1:-4]): size for name, size in listed.items()
                           if name.endswith(".bin") and name[len(FOLDER) + 1:-4].isdigit()}
        return self._sizes

    def segments(self) -> list[int]:
        return sorted(self.sizes)

    def slots(self, segment: int) -> int:
        return self.sizes.get(segment, 0) // self.record_bytes

    def check(self, needed: Mapping[int, int]) -> str | None:
        for segment, count in sorted(needed.items()):
            name = f"{self.location}/{self._name(segment)}"
            if segment not in self.sizes:
                return f"feature segment {name} is missing ({count} stored images need it)"
            if self.slots(segment) < count:
                return f"feature segment {name} holds {self.slots(segment)} records, but its rows need {count}: " \
                       "it was cut short"
        return None

    def start(self, needed: Mapping[int, int]) -> None:
        pass  # nothing is appended to: every commit writes a new segment

    def append(self, segment: int, records: Sequence[bytes]) -> list[int]:
        """Write the records as the new segment `segment` (one PUT); returns their slots."""
        for record in records:
            if len(record) != self.record_bytes:
                raise ValueError(f"feature record of {len(record)} bytes, expected {self.record_bytes}")
        if segment in self.sizes:
            raise ValueError(f"feature segment {segment} exists already; objects are written once")
        data = b"".join(records)
        self.location.write_bytes(self._name(segment), data, create=True)  # never over another writer's
        self.sizes[segment] = len(data)
        return list(range(len(records)))

    def read(self, segment: int, slot: int) -> bytes:
        try:
            data = self.location.read_range(self._name(segment), slot * self.record_bytes, self.record_bytes)
        except FileNotFoundError:
            raise SegmentCutShort(f"feature segment {self.location}/{self._name(segment)} is missing") from None
        if len(data) != self.record_bytes:
            raise SegmentCutShort(f"feature segment {self.location}/{self._name(segment)} has no record {slot}: "
                                  "it was cut short")
        return data

    def read_many(self, places: Sequence[tuple[int, int]]) -> list[bytes]:
        """Ranged GETs, 16 at a time: a query's 64 candidates cost about four round trips."""
        if len(places) <= 1:
            return [self.read(segment, slot) for segment, slot in places]
        with ThreadPoolExecutor(min(16, len(places))) as pool:
            return list(pool.map(lambda place: self.read(*place), places))

    def remove(self, segments: Sequence[int]) -> None:
        for segment in segments:
            self.location.remove(self._name(segment))
            self.sizes.pop(segment, None)


def needed_records(segments: np.ndarray, slots: np.ndarray) -> dict[int, int]:
    """segment -> highest slot named + 1, from the (segment, slot) of every image row."""
    if len(segments) == 0:
        return {}
    segments, slots = np.asarray(segments, np.int64), np.asarray(slots, np.int64)
    order = np.lexsort((slots, segments))
    last = np.r_[np.flatnonzero(np.diff(segments[order])), len(order) - 1]  # last row of each segment
    return {int(segments[order][i]): int(slots[order][i]) + 1 for i in last}
