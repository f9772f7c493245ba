"""One indexing run: scan -> plan -> load -> encode -> store, resumable and incremental.

The run receives the model and the store, so tests can pass fakes. Plan per file:
  unchanged   same path, size and mtime as stored                    -> nothing
  reused      new or changed file whose content hash is stored already
              (moved, renamed, copied, or touched)                    -> new file row only
  encode      content not stored                                      -> decode, encode, store
  removed     stored path under a scanned folder that is gone         -> row deleted
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from blipsearch.retrieval.errors import ImageLoadError
from blipsearch.retrieval.models.base import RetrievalModel

from . import codec
from .images import LoadedImage, failure_reason, load_image
from .scan import FileStat, content_hash, is_under, resolve_roots, scan
from .store import FileRecord, ImageRecord, IndexWriter

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
COMPACT_EVERY = 64  # batches between compactions, to keep fragments few while a long run goes on


@dataclass
class IndexSummary:
    indexed: int = 0  # files whose content was encoded
    reused: int = 0  # new paths whose content was already stored (moved, renamed, copied)
    unchanged: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


@dataclass
class IndexOptions:
    batch_size: int = 16
    workers: int = 2  # decoding threads (0: decode in the encoding thread, no overlap)
    progress: bool = True
    reduced_decode: bool = True  # JPEGs decode at reduced scale (see images.load_image)
    on_skip: Callable[[str, str], None] | None = None  # called as files are skipped


def index_folders(roots: Sequence[str | Path], model: RetrievalModel, store: IndexWriter,
                  options: IndexOptions | None = None) -> IndexSummary:
    options = options or IndexOptions()
    summary = IndexSummary()
    folders = resolve_roots(roots)
    found = scan(folders)
    stored = store.file_records()
    _remove_vanished(store, stored, found.files, [str(f) for f in folders], found.unreadable_dirs, summary)
    changed = [f for f in found.files if not _unchanged(stored.get(f.path), f)]
    summary.unchanged = len(found.files) - len(changed)
    to_encode = _reuse_known(store, stored, changed, options, summary)
    _encode_all(store, model, to_encode, options, summary)
    store.prune_images()
    store.finish()
    return summary


def _unchanged(record: FileRecord | None, stat: FileStat) -> bool:
    return record is not None and record.size == stat.size and record.mtime_ns == stat.mtime_ns


def _remove_vanished(store: IndexWriter, stored: dict[str, FileRecord], files: list[FileStat], folders: list[str],
                     unreadable: list[str], summary: IndexSummary) -> None:
    present = {f.path for f in files}
    gone = [p for p in stored if is_under(p, folders) and p not in present and not is_under(p, unreadable)]
    store.delete_files(gone)
    summary.removed = len(gone)


def _reuse_known(store: IndexWriter, stored: dict[str, FileRecord], changed: list[FileStat],
                 options: IndexOptions, summary: IndexSummary) -> dict[str, list[FileStat]]:
    """Hash new and changed files; record those whose content is stored; group the rest by hash."""
    known = store.known_hashes()
    reused: list[FileRecord] = []
    to_encode: dict[str, list[FileStat]] = {}
    hashes = bounded_map(_hash_or_reason, changed, options.workers)
    for stat, digest in tqdm(zip(changed, hashes, strict=True), total=len(changed), desc="hashing",
                             unit="file", disable=not options.progress or not changed, leave=False):
        if isinstance(digest, ImageLoadError):
            _skip(stat.path, str(digest), options, summary)
            if stat.path in stored:
                store.delete_files([stat.path])
        elif digest in known:
            reused.append(FileRecord(stat.path, stat.size, stat.mtime_ns, digest))
        else:
            to_encode.setdefault(digest, []).append(stat)
    store.upsert_files(reused)
    summary.reused = sum(1 for r in reused if r.path not in stored or stored[r.path].hash != r.hash)
    summary.unchanged += len(reused) - summary.reused  # touched files: same bytes, new mtime
    return to_encode


def _hash_or_reason(stat: FileStat) -> str | ImageLoadError:
    try:
        return content_hash(stat.path)
    except OSError as exc:
        return ImageLoadError(failure_reason(stat.path, exc))


def _encode_all(store: IndexWriter, model: RetrievalModel, to_encode: dict[str, list[FileStat]],
                options: IndexOptions, summary: IndexSummary) -> None:
    """Decode in threads while the model encodes; one store commit per batch."""
    items = list(to_encode.items())
    pre = model.info.preprocessing
    loaded = bounded_map(lambda item: _load_first(item[1], pre, options.reduced_decode), items, options.workers,
                         ahead=2 * options.batch_size)
    progress = tqdm(total=sum(len(stats) for _, stats in items), desc="indexing", unit="img",
                    disable=not options.progress or not items)
    batch: list[tuple[str, list[FileStat], LoadedImage]] = []
    batches = 0
    for (digest, stats), result in zip(items, loaded, strict=True):
        if isinstance(result, tuple):  # (path, reason): no copy of this content decodes
            for stat in stats:
                _skip(stat.path, result[1], options, summary)
                store.delete_files([stat.path])  # a stored older version of this path is stale now
            progress.update(len(stats))
            continue
        batch.append((digest, stats, result))
        if len(batch) == options.batch_size:
            _write_batch(store, model, batch, summary, progress)
            batch, batches = [], batches + 1
            if batches % COMPACT_EVERY == 0:
                store.compact()
    _write_batch(store, model, batch, summary, progress)
    progress.close()


def _load_first(stats: list[FileStat], pre, reduced_decode: bool) -> LoadedImage | tuple[str, str]:
    try:
        return load_image(stats[0].path, pre, reduced_decode=reduced_decode)
    except ImageLoadError as exc:
        return (stats[0].path, str(exc))


def _write_batch(store: IndexWriter, model: RetrievalModel, batch: list, summary: IndexSummary, progress) -> None:
    if not batch:
        return
    encoded = model.encode_images(model.pixel_values([image.pixels for _, _, image in batch]))
    packed = codec.pack(encoded.features)
    store.add_images([
        ImageRecord(digest, encoded.embeddings[i].numpy(), packed[i], image.width, image.height)
        for i, (digest, _, image) in enumerate(batch)
    ])
    files = [FileRecord(s.path, s.size, s.mtime_ns, digest) for digest, stats, _ in batch for s in stats]
    store.upsert_files(files)  # after the images: a crash in between leaves only re-usable features
    summary.indexed += len(files)
    progress.update(len(files))


def _skip(path: str, reason: str, options: IndexOptions, summary: IndexSummary) -> None:
    summary.skipped.append((path, reason))
    if options.on_skip:
        options.on_skip(path, reason)


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int = 64) -> Iterator[R]:
    """`map` in a thread pool, in order, with at most `ahead` results waiting (bounded memory).

    workers=0 maps in the calling thread, without overlap (for measuring what the overlap brings).
    """
    if workers == 0:
        yield from map(fn, items)
        return
    items = iter(items)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque(pool.submit(fn, item) for item in islice(items, ahead))
        while pending:
            result = pending.popleft().result()
            for item in islice(items, 1):
                pending.append(pool.submit(fn, item))
            yield result
