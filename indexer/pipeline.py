"""One indexing run: scan -> plan -> load -> encode -> store, resumable and incremental.

The run receives the model and the store, so tests can pass fakes. Plan per file:
  unchanged   same path, size and mtime as stored                    -> nothing, not even read
  reused      new or changed file whose content hash is stored already
              (moved, renamed, copied, or touched)                    -> new file row only
  encode      content not stored                                      -> decode, encode, store
  removed     stored path under a scanned folder that is gone         -> row deleted

Worker threads read each new or changed file once, hash its bytes and decode them if the content is new,
while the main thread encodes the previous batch. Only regular files within the size limit are read, and a
picture's header is checked before its bytes are read (scan.open_regular, images.check_header). A read
that does not finish within READ_TIMEOUT_S skips its file; the workers are daemon threads, so one stuck
in the kernel (a hung network drive) never keeps the process from ending.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from blipsearch.retrieval.errors import ImageLoadError, InvalidInputError
from blipsearch.retrieval.models.base import RetrievalModel

from . import codec
from .images import LoadedImage, check_header, failure_reason, load_image
from .readahead import TooManyStuck, bounded_map
from .scan import FileStat, is_under, open_regular, read_hashed, resolve_roots, scan
from .store import FileRecord, ImageRecord, IndexWriter

log = logging.getLogger(__name__)

COMPACT_EVERY = 64  # batches between compactions, to keep fragments few while a long run goes on
READ_TIMEOUT_S = 60.0  # a file not read and decoded within this many seconds is skipped (a hung drive)
MAX_STUCK_READS = 16  # reads that never returned before the run stops: each holds a thread for good


@dataclass
class IndexSummary:
    indexed: int = 0  # files whose content was encoded (or stored by a killed run that did not name it yet)
    reused: int = 0  # new paths whose content was already stored (moved, renamed, copied)
    unchanged: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


@dataclass
class IndexOptions:
    batch_size: int = 16
    workers: int = 2  # decoding threads (0: one, that never runs ahead of the encoder: no overlap)
    progress: bool = True
    reduced_decode: bool = True  # JPEGs decode at reduced scale (see images.load_image)
    allow_empty: bool = False  # an empty folder removes its indexed files (else they are kept, with a warning)
    on_skip: Callable[[str, str], None] | None = None  # called as files are skipped


def index_folders(roots: Sequence[str | Path], model: RetrievalModel, store: IndexWriter,
                  options: IndexOptions | None = None) -> IndexSummary:
    options = options or IndexOptions()
    summary = IndexSummary()
    folders = resolve_roots(roots)
    found = scan(folders)
    for path, reason in found.skipped:
        _skip(path, reason, options, summary)
    stored = store.file_records()
    kept = _empty_folders_with_files(folders, found, stored, options.allow_empty)
    _remove_vanished(store, stored, found.files, [str(f) for f in folders], found.unreadable_dirs + kept, summary)
    changed = [f for f in found.files if not _unchanged(stored.get(f.path), f)]
    summary.unchanged = len(found.files) - len(changed)
    _Run(store, model, stored, options, summary).process(changed)
    store.prune_images()
    store.finish()
    return summary


def _empty_folders_with_files(folders: list[Path], found, stored: dict[str, FileRecord],
                              allow_empty: bool) -> list[str]:
    """Folders that now look empty but had indexed files: an unmounted drive, most likely. Kept unless allowed."""
    if allow_empty:
        return []
    empty = [str(f) for f in folders if not any(is_under(x.path, [str(f)]) for x in found.files)]
    held = [f for f in empty if any(is_under(p, [f]) for p in stored)]
    for folder in held:
        log.warning("%s is empty, but the index holds files from it: kept (an unmounted drive?); "
                    "pass --allow-empty to remove them", folder)
    return held


def _unchanged(record: FileRecord | None, stat: FileStat) -> bool:
    return record is not None and record.size == stat.size and record.mtime_ns == stat.mtime_ns


def _remove_vanished(store: IndexWriter, stored: dict[str, FileRecord], files: list[FileStat], folders: list[str],
                     unreadable: list[str], summary: IndexSummary) -> None:
    present = {f.path for f in files}
    gone = [p for p in stored if is_under(p, folders) and p not in present and not is_under(p, unreadable)]
    store.delete_files(gone)
    summary.removed = len(gone)


@dataclass
class _Read:
    """What a worker made of one file: its content hash, and the decoded image when that content is new."""

    stat: FileStat
    digest: str | None = None
    image: LoadedImage | None = None
    reason: str | None = None  # why the file was skipped


class _Run:
    """Streams changed files through read -> hash -> (decode -> encode) -> store, one commit per batch."""

    def __init__(self, store: IndexWriter, model: RetrievalModel, stored: dict[str, FileRecord],
                 options: IndexOptions, summary: IndexSummary):
        self.store, self.model, self.stored, self.options, self.summary = store, model, stored, options, summary
        self.known = store.known_hashes()  # contents with stored features (grows as batches commit)
        self.named = {record.hash for record in stored.values()}  # contents some file row points to
        self.batch: dict[str, tuple[LoadedImage, list[FileStat]]] = {}  # new contents waiting for the encoder
        self.reused: list[FileRecord] = []  # files of known contents, written with the next commit
        self.batches = 0

    def process(self, changed: list[FileStat]) -> None:
        read = bounded_map(self._read, changed, self.options.workers, ahead=2 * self.options.batch_size,
                           timeout=READ_TIMEOUT_S, on_timeout=self._timed_out, max_stuck=MAX_STUCK_READS)
        quiet = not self.options.progress or not changed
        with closing(read), tqdm(total=len(changed), desc="indexing", unit="img", disable=quiet) as self.progress:
            try:
                for item in read:
                    self._take(item)
            except TooManyStuck as exc:
                raise InvalidInputError(f"{exc.count} files did not answer within {READ_TIMEOUT_S:g} s each, e.g. "
                                        f"{exc.item.path}: is a drive unreachable? Finished batches are kept; "
                                        "run again once it answers") from None
            self._commit()

    def _read(self, stat: FileStat) -> _Read:
        """In a worker thread: read the file once, hash it, decode it only if its content is new."""
        try:
            with open_regular(stat.path) as file:
                check_header(file, stat.path)  # no image, or a decompression bomb: refused before reading it whole
                data, digest = read_hashed(file)
        except ImageLoadError as exc:
            return _Read(stat, reason=str(exc))
        except OSError as exc:
            return _Read(stat, reason=failure_reason(stat.path, exc))
        if digest in self.known:
            return _Read(stat, digest)
        try:
            image = load_image(stat.path, self.model.info.preprocessing, reduced_decode=self.options.reduced_decode,
                               data=data)
        except ImageLoadError as exc:
            return _Read(stat, digest, reason=str(exc))
        return _Read(stat, digest, image)

    @staticmethod
    def _timed_out(stat: FileStat) -> _Read:
        return _Read(stat, reason=f"read timed out (no answer in {READ_TIMEOUT_S:g} s; a hung drive?)")

    def _take(self, item: _Read) -> None:
        stat, digest = item.stat, item.digest
        if item.reason is not None:
            self._skip(stat, item.reason)
        elif digest in self.known:
            self._count_reuse(stat, digest)
            self.reused.append(FileRecord(stat.path, stat.size, stat.mtime_ns, digest))
        elif digest in self.batch:  # an identical copy is already waiting: encode once
            self.batch[digest][1].append(stat)
        elif item.image is None:  # known when read, and this run pruned nothing since: cannot happen
            raise AssertionError(f"{stat.path}: content neither stored nor decoded")
        else:
            self.batch[digest] = (item.image, [stat])
        if len(self.batch) >= self.options.batch_size:
            self._commit()

    def _commit(self) -> None:
        """Encode the waiting images; store features, then image rows, then file rows (reused ones too)."""
        files = list(self.reused)
        if self.batch:
            digests = list(self.batch)
            images = [self.batch[d][0] for d in digests]
            encoded = self.model.encode_images(self.model.pixel_values([image.pixels for image in images]))
            packed = codec.pack(encoded.features)
            self.store.add_images([
                ImageRecord(d, encoded.embeddings[i].numpy(), packed[i], images[i].width, images[i].height)
                for i, d in enumerate(digests)])
            new = [FileRecord(s.path, s.size, s.mtime_ns, d) for d in digests for s in self.batch[d][1]]
            files += new
            self.known.update(digests)
            self.named.update(digests)
            self.summary.indexed += len(new)
        self.store.upsert_files(files)  # after the images: a crash in between leaves only re-usable features
        self.progress.update(len(files))
        self.batch, self.reused = {}, []
        self.batches += 1
        if self.batches % COMPACT_EVERY == 0:
            self.store.compact()

    def _count_reuse(self, stat: FileStat, digest: str) -> None:
        old = self.stored.get(stat.path)
        if old is not None and old.hash == digest:
            self.summary.unchanged += 1  # touched: same bytes, new mtime
        elif digest in self.named:
            self.summary.reused += 1  # moved, renamed or copied
        else:  # features a killed run stored before its file rows: this run finishes indexing the file
            self.summary.indexed += 1
        self.named.add(digest)

    def _skip(self, stat: FileStat, reason: str) -> None:
        if stat.path in self.stored:
            self.store.delete_files([stat.path])  # the stored older version of this path is stale now
        _skip(stat.path, reason, self.options, self.summary)
        self.progress.update(1)


def _skip(path: str, reason: str, options: IndexOptions, summary: IndexSummary) -> None:
    summary.skipped.append((path, reason))
    if options.on_skip:
        options.on_skip(path, reason)
