"""One indexing run: scan -> plan -> load -> encode -> store, resumable and incremental.

The run receives the model and the store, so tests can pass fakes. Plan per file:
  unchanged   same path, size and mtime as stored                    -> nothing, not even read
  reused      new or changed file whose content hash is stored already
              (moved, renamed, copied, or touched)                    -> new file row only
  encode      content not stored                                      -> decode, encode, store
  removed     stored path under a scanned folder that is gone         -> row deleted (not counted as removed
              where a new path of the run took its content: it moved)

Worker threads read each new or changed file once, hash its bytes, read its metadata (date taken, camera)
and decode it if the content is new, while the main thread encodes the previous batch. Only regular files
within the size limit are read, and a picture's header is checked before its bytes are read
(scan.open_regular, images.check_header). A read that does not finish within READ_TIMEOUT_S skips its
file; the workers are daemon threads, so one stuck in the kernel (a hung network drive) never keeps the
process from ending. Rows written before metadata was kept count as changed once: their files are read
again (their contents are not encoded again).

Captions (`IndexOptions.captioner`): each new content is captioned with its batch, and each stored one
without a caption by this captioner has one of its files read and decoded again (an index captioned after
the fact). A caption that fails is left out, never the image; the next run tries again.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import Counter
from collections.abc import Callable, Container, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from blipsearch.retrieval.errors import (
    BlipsearchError,
    ImageLoadError,
    InvalidInputError,
    ModelLoadError,
    StoreError,
    first_line,
    printable,
)
from blipsearch.retrieval.models.base import RetrievalModel

from . import codec, objects
from .images import LoadedImage, check_header, failure_reason, load_image, naming_warnings
from .metadata import FileMeta, read_meta
from .readahead import TooManyStuck, bounded_map
from .scan import FileStat, ScanResult, is_under, open_regular, read_hashed, resolve_roots, scan, supported_extensions
from .store import FileRecord, ImageRecord, IndexWriter

if TYPE_CHECKING:
    import numpy as np

    from blipsearch.retrieval.models.base import Preprocessing
    from blipsearch.retrieval.models.captioner import Captioner

log = logging.getLogger(__name__)

COMPACT_EVERY = 64  # batches between compactions, to keep fragments few while a long run goes on
READ_TIMEOUT_S = 60.0  # a file not read and decoded within this many seconds is skipped (a hung drive)
MAX_STUCK_READS = 16  # reads that never returned before the run stops: each holds a thread for good
MAX_UNREACHABLE = 16  # reads in a row that the storage did not answer (a network error) before the run stops


@dataclass
class IndexSummary:
    indexed: int = 0  # files whose content was encoded (or stored by a killed run that did not name it yet)
    reused: int = 0  # new paths whose content was already stored (moved, renamed, copied)
    unchanged: int = 0
    removed: int = 0  # paths that left the index, but the old paths of moved files (see `discount_moves`)
    captioned: int = 0  # contents that received a caption
    uncaptioned: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of captions that failed
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    vanished: list[str] = field(default_factory=list, repr=False)  # content hashes of the paths removed as gone
    reused_hashes: list[str] = field(default_factory=list, repr=False)  # of the new paths counted in `reused`

    def discount_moves(self) -> None:
        """A vanished path whose content a new path of this run took (a move, a rename) was no removal:
        "removed 130" once read as 130 photos lost where 120 had moved."""
        taken = Counter(self.reused_hashes)
        self.removed -= sum(min(n, taken[digest]) for digest, n in Counter(self.vanished).items())


@dataclass(frozen=True)
class CaptionerSource:
    """A captioner by name, loaded only when a run has something to caption. The name is what a stored
    caption records: a content captioned under another name is captioned again."""

    name: str
    load: Callable[[], Captioner]


@dataclass
class IndexOptions:
    batch_size: int = 16
    # decoding threads (0: one, that never runs ahead of the encoder: no overlap); None: `default_workers`
    workers: int | None = None
    progress: bool = True
    reduced_decode: bool = True  # JPEGs decode at reduced scale (see images.load_image)
    allow_empty: bool = False  # an empty folder removes its indexed files (else they are kept, with a warning)
    on_skip: Callable[[str, str], None] | None = None  # called as files are skipped
    captioner: CaptionerSource | None = None  # write captions (see the module docstring)


def default_workers(model: RetrievalModel) -> int:
    """Decoding threads by default: 1 where the encoder computes on the CPU, 2 beside a GPU.

    On the CPU the encoder wants every core, and one thread reads, decodes and resizes a 12 MP photo in
    36-43 ms (the bf16 and the AVX2 EPYC we measure on), far ahead of any CPU encoder measured (0.25-0.96 s
    per photo); a second one only competes with it (2-core AVX2 EPYC, 160 photos, alternating runs: 1.075
    and 1.124 images/s with one, 1.066 and 1.069 with two). A GPU encodes faster than one thread decodes."""
    return 1 if getattr(model.device, "type", model.device) == "cpu" else 2  # a torch.device, or "cpu"


def index_folders(roots: Sequence[str | Path], model: RetrievalModel, store: IndexWriter,
                  options: IndexOptions | None = None) -> IndexSummary:
    options = options or IndexOptions()
    summary = IndexSummary()
    found, changed = plan(roots, store, options, summary)
    stored = store.file_records()  # as read at open: `plan`'s deletions do not change it
    recaption = []
    if options.captioner is not None:
        recaption = _to_caption(found.files, changed, stored, store.captioned(), options.captioner.name)
    _Run(store, model, stored, options, summary).process(changed, recaption)
    store.prune_images()
    summary.discount_moves()
    store.finish()
    return summary


def plan(roots: Sequence[str | Path], store: IndexWriter, options: IndexOptions,
         summary: IndexSummary) -> tuple[ScanResult, list[FileStat]]:
    """Scan the roots, remove the rows of vanished files, and return the scan and the files to read (new or
    changed); skipped and unchanged files are counted in `summary`."""
    folders = [str(f) for f in resolve_roots(roots, options.allow_empty)]
    found = scan(folders)
    for path, reason in found.skipped:
        skip_file(path, reason, options, summary)
    stored = store.file_records()
    kept = _empty_folders_with_files(folders, found, stored, options.allow_empty)
    kept += _dangling_links_with_files(found.dangling, stored, options, summary)
    missing = [f for f in folders if not objects.is_remote(f) and not os.path.lexists(f)]
    for folder in set(missing) - set(_holding(missing, stored)):  # a name mistyped, most likely
        log.warning("%s does not exist, and the index holds nothing from it: nothing to remove", folder)
    _remove_vanished(store, stored, found.files, folders, found.unreadable_dirs + kept, summary)
    changed = [f for f in found.files if not _unchanged(stored.get(f.path), f)]
    summary.unchanged = len(found.files) - len(changed)
    return found, changed


def _empty_folders_with_files(folders: list[str], found, stored: dict[str, FileRecord],
                              allow_empty: bool) -> list[str]:
    """Folders that now look empty but had indexed files: an unmounted drive, most likely. Kept unless allowed."""
    if allow_empty:
        return []
    empty = [f for f in folders if not any(is_under(x.path, [f]) for x in found.files)]
    held = _holding(empty, stored)
    for folder in held:
        log.warning("%s is empty, but the index holds files from it: kept (an unmounted drive?); "
                    "pass --allow-empty to remove them", folder)
    return held


def _dangling_links_with_files(links: list[str], stored: dict[str, FileRecord], options: IndexOptions,
                               summary: IndexSummary) -> list[str]:
    """Links whose target is gone but the index holds files from (an unplugged drive): kept, and skipped
    (exit status 3), unless `allow_empty`. Their files were removed silently, and encoded again when the
    drive came back. Of the others, one named as a picture is skipped as a broken link; the rest (a stale
    `notes.txt` link) are none of the run's business."""
    held = set(_holding(links, stored))
    for link in links:
        if link not in held and Path(link).suffix.lower() in supported_extensions():
            skip_file(link, "no such file (vanished, or a broken link)", options, summary)
    if options.allow_empty:
        return []
    for link in sorted(held):
        skip_file(link, "this link leads nowhere now (its target is gone: an unplugged drive?); what is stored "
                        "from it stays (--allow-empty removes it)", options, summary)
    return sorted(held)


def _holding(places: list[str], stored: dict[str, FileRecord]) -> list[str]:
    """The folders (or links) of `places` that the index holds files from."""
    return [place for place in places if any(is_under(p, [place]) for p in stored)]


def _unchanged(record: FileRecord | None, stat: FileStat) -> bool:
    """Same size and mtime, and its metadata was read (rows from before metadata was kept are read once)."""
    return record is not None and record.size == stat.size and record.mtime_ns == stat.mtime_ns and \
        bool(record.meta)


def _to_caption(files: list[FileStat], changed: list[FileStat], stored: dict[str, FileRecord],
                captioned: dict[str, str], captioner: str) -> list[FileStat]:
    """One unchanged file of each stored content without a caption by `captioner`."""
    changed_paths = {f.path for f in changed}
    picked: dict[str, FileStat] = {}
    for f in files:
        record = stored.get(f.path)
        if record is not None and f.path not in changed_paths and record.hash not in picked \
                and captioned.get(record.hash) != captioner:
            picked[record.hash] = f
    return list(picked.values())


def _remove_vanished(store: IndexWriter, stored: dict[str, FileRecord], files: list[FileStat], folders: list[str],
                     unreadable: list[str], summary: IndexSummary) -> None:
    present = {f.path for f in files}
    gone = [p for p in stored if is_under(p, folders) and p not in present and not is_under(p, unreadable)]
    store.delete_files(gone)
    summary.removed, summary.vanished = len(gone), [stored[p].hash for p in gone]


@dataclass
class _Read:
    """What a worker made of one file: its content hash and metadata, the decoded image when that content is
    new, and its bytes when its content needs a caption (the main thread decodes them for the captioner, which
    it loads on first use: never within a read's time limit)."""

    stat: FileStat
    digest: str | None = None
    image: LoadedImage | None = None
    reason: str | None = None  # why the file was skipped
    meta: FileMeta | None = None
    caption_data: bytes | None = None  # the file's bytes, kept where its content needs a caption
    caption_only: bool = False  # an unchanged file read for its content's caption alone
    unreachable: bool = False  # its storage did not answer (`reason` says so): what is stored of it stays


class _Run:
    """Streams changed files through read -> hash -> (decode -> encode) -> store, one commit per batch."""

    def __init__(self, store: IndexWriter, model: RetrievalModel, stored: dict[str, FileRecord],
                 options: IndexOptions, summary: IndexSummary):
        self.store, self.model, self.stored, self.options, self.summary = store, model, stored, options, summary
        self._captioner: Captioner | None = None  # loaded by the first content that needs a caption
        self.known = store.known_hashes()  # contents with stored features (grows as batches commit)
        self.named = {record.hash for record in stored.values()}  # contents some file row points to
        # contents that need a caption from this run's captioner (none without one)
        self.uncaptioned = _Uncaptioned(store.captioned(), options.captioner.name if options.captioner else None)
        # new contents waiting for the encoder: image, files, bytes for the captioner
        self.batch: dict[str, tuple[LoadedImage, list[_Read], bytes | None]] = {}
        self.reused: list[FileRecord] = []  # files of known contents, written with the next commit
        self.captions: dict[str, _Waiting] = {}  # stored contents to caption
        self.batches = 0
        self.unreachable = 0  # files in a row whose storage did not answer

    def process(self, changed: list[FileStat], recaption: list[FileStat] = ()) -> None:
        work = [(stat, False) for stat in changed] + [(stat, True) for stat in recaption]
        workers = default_workers(self.model) if self.options.workers is None else self.options.workers
        read = bounded_map(self._read, work, workers, ahead=2 * self.options.batch_size,
                           timeout=READ_TIMEOUT_S, on_timeout=self._timed_out, max_stuck=MAX_STUCK_READS)
        quiet = not self.options.progress or not work
        with closing(read), tqdm(total=len(work), desc="indexing", unit="img", disable=quiet) as self.progress:
            try:
                for item in read:
                    self._take(item)
            except TooManyStuck as exc:
                raise InvalidInputError(f"{exc.count} files did not answer within {READ_TIMEOUT_S:g} s each, e.g. "
                                        f"{exc.item.path}: is a drive unreachable? Finished batches are kept; "
                                        "run again once it answers") from None
            self._commit()

    def _read(self, work: tuple[FileStat, bool]) -> _Read:
        """In a worker thread: `read_file`, keeping the bytes of a content that needs a caption."""
        stat, caption_only = work
        read, data = read_file(stat, self.known, self.model.info.preprocessing, self.options.reduced_decode)
        read.caption_only = caption_only
        if data is not None and read.digest in self.uncaptioned:
            read.caption_data = data
        return read

    @property
    def captioner(self) -> Captioner:
        """The captioner, loaded on first use, in the main thread."""
        if self._captioner is None:
            try:
                self._captioner = self.options.captioner.load()
            except BlipsearchError:
                raise
            except Exception as exc:  # out of memory, a device error: still one line, and batches so far kept
                raise ModelLoadError(f"cannot load the captioner {self.options.captioner.name}: "
                                     f"{first_line(exc)}") from exc
        return self._captioner

    def _caption_pixels(self, waiting: _Waiting) -> np.ndarray | None:
        """The picture at the captioner's input size: the encoder's pixels where the sizes agree."""
        pre = self.captioner.info.preprocessing
        if waiting.image is not None and _same_input(pre, self.model.info.preprocessing):
            return waiting.image.pixels
        try:
            return load_image(waiting.path, pre, reduced_decode=self.options.reduced_decode, data=waiting.data).pixels
        except ImageLoadError as exc:  # decoded for the encoder, yet not now: leave the caption out
            self.summary.uncaptioned.append((waiting.path, str(exc)))
            return None

    @staticmethod
    def _timed_out(work: tuple[FileStat, bool]) -> _Read:
        return _Read(work[0], reason=f"read timed out (no answer in {READ_TIMEOUT_S:g} s; a hung drive?)",
                     caption_only=work[1])

    def _take(self, item: _Read) -> None:
        stat, digest = item.stat, item.digest
        if not item.unreachable:
            self.unreachable = 0  # in a row: a few files of a failing disk stop nothing, a storage down does
        if item.caption_only:
            self._take_caption_only(item)
        elif item.unreachable:
            self._skip_unreachable(item)
        elif item.reason is not None:
            self._skip(stat, item.reason)
        elif digest in self.known:
            self._count_reuse(stat, digest)
            self.reused.append(_file_record(item))
            if item.caption_data is not None and digest not in self.captions:
                self.captions[digest] = _Waiting(stat.path, None, item.caption_data)
        elif digest in self.batch:  # an identical copy is already waiting: encode once
            self.batch[digest][1].append(item)
        elif item.image is None:  # known when read, and this run pruned nothing since: cannot happen
            raise AssertionError(f"{stat.path}: content neither stored nor decoded")
        else:
            self.batch[digest] = (item.image, [item], item.caption_data)
        if len(self.batch) >= self.options.batch_size or len(self.captions) >= self.options.batch_size:
            self._commit()

    def _take_caption_only(self, item: _Read) -> None:
        """An unchanged file read for its stored content's caption: nothing else of it changes."""
        if item.reason is not None:
            self.summary.uncaptioned.append((item.stat.path, item.reason))
        elif item.digest in self.known and item.caption_data is not None:
            self.captions.setdefault(item.digest, _Waiting(item.stat.path, None, item.caption_data))
        # else: the file changed since the scan; the next run indexes it
        self.progress.update(1)

    def _commit(self) -> None:
        """Encode the waiting images; store features, then image rows, then file rows (reused ones too);
        captions of stored contents last."""
        files = list(self.reused)
        if self.batch:
            digests = list(self.batch)
            images = [self.batch[d][0] for d in digests]
            encoded = self.model.encode_images(self.model.pixel_values([image.pixels for image in images]))
            if not bool(encoded.embeddings.isfinite().all()):  # LanceDB refused them with a traceback
                raise ModelLoadError(f"the model {self.model.info.model_id} gives embeddings that are not finite "
                                     f"numbers (NaN or inf), e.g. for {self.batch[digests[0]][1][0].stat.path}: its "
                                     "weights are broken (a training run that diverged?); index with another model")
            packed = codec.pack(encoded.features)
            captions = self._caption({d: _Waiting(self.batch[d][1][0].stat.path, self.batch[d][0], self.batch[d][2])
                                      for d in digests})
            label = self.options.captioner.name if self.options.captioner else None
            self.store.add_images([
                ImageRecord(d, encoded.embeddings[i].numpy(), packed[i], images[i].width, images[i].height,
                            captions.get(d), label if d in captions else None)
                for i, d in enumerate(digests)])
            new = [_file_record(read) for d in digests for read in self.batch[d][1]]
            files += new
            self.known.update(digests)
            self.named.update(digests)
            self.summary.indexed += len(new)
        self.store.upsert_files(files)  # after the images: a crash in between leaves only re-usable features
        if self.captions:
            captions = self._caption(self.captions)
            self.store.set_captions([(d, text, self.options.captioner.name) for d, text in captions.items()])
        self.progress.update(len(files))
        self.batch, self.reused, self.captions = {}, [], {}
        self.batches += 1
        if self.batches % COMPACT_EVERY == 0:
            self.store.compact()

    def _caption(self, waiting: dict[str, _Waiting]) -> dict[str, str]:
        """Captions of the contents that wait for one (those with bytes kept); failures are reported by path
        and left out."""
        todo = [(d, w.path, pixels) for d, w in waiting.items()
                if w.data is not None and (pixels := self._caption_pixels(w)) is not None]
        if not todo:
            return {}
        texts = self.captioner.caption([pixels for _, _, pixels in todo])
        out = {}
        for (digest, path, _), text in zip(todo, texts, strict=True):
            if not text:  # None: it failed; "": it wrote nothing
                self.summary.uncaptioned.append((path, "the captioner failed on it" if text is None else
                                                 "the captioner wrote nothing"))
            else:
                out[digest] = text
                self.uncaptioned.done(digest)
        self.summary.captioned += len(out)
        return out

    def _count_reuse(self, stat: FileStat, digest: str) -> None:
        old = self.stored.get(stat.path)
        if old is not None and old.hash == digest:
            self.summary.unchanged += 1  # touched: same bytes, new mtime
        elif digest in self.named:
            self.summary.reused += 1  # moved, renamed or copied
            self.summary.reused_hashes.append(digest)
        else:  # features a killed run stored before its file rows: this run finishes indexing the file
            self.summary.indexed += 1
        self.named.add(digest)

    def _skip_unreachable(self, item: _Read) -> None:
        """Skipped, its stored row kept (it was deleted as if the file had changed into a broken one); after
        MAX_UNREACHABLE of them the run stops: the storage is down, and every further file would fail too."""
        self.unreachable += 1
        skip_file(item.stat.path, item.reason, self.options, self.summary)
        self.progress.update(1)
        if self.unreachable >= MAX_UNREACHABLE:
            self._commit()
            raise StoreError(f"{self.unreachable} files in a row could not be read (each named above), e.g. "
                             f"{printable(item.stat.path)}: is the storage reachable? What is stored is kept; run "
                             "again once it answers")

    def _skip(self, stat: FileStat, reason: str) -> None:
        old = self.stored.get(stat.path)
        # the stored older version of this path is stale now; one of the same size and mtime (read again only
        # for the metadata an older blipsearch did not keep) is not
        if old is not None and (old.size, old.mtime_ns) != (stat.size, stat.mtime_ns):
            self.store.delete_files([stat.path])
            self.summary.removed += 1
            reason += "; the version indexed before left the index"
        skip_file(stat.path, reason, self.options, self.summary)
        self.progress.update(1)


@dataclass
class _Waiting:
    """A content waiting for its caption: one of its paths, the encoder's image if decoded, the file's bytes."""

    path: str
    image: LoadedImage | None
    data: bytes | None


def read_file(stat: FileStat, known: Container[str], preprocessing: Preprocessing,
              reduced_decode: bool) -> tuple[_Read, bytes | None]:
    """Read a file once, hash it and read its metadata; decode it only if its content is not `known`.
    Returns the read and the file's bytes (None where it failed)."""
    try:
        with open_regular(stat.path) as file:
            check_header(file, stat.path)  # no image, or a decompression bomb: refused before reading it whole
            data, digest = read_hashed(file)
    except ImageLoadError as exc:
        return _Read(stat, reason=str(exc)), None
    except OSError as exc:
        if _unreachable(exc):  # the storage did not answer: nothing is known of the file, so nothing changes
            return _Read(stat, reason=f"{UNREACHABLE_REASON} ({first_line(exc)}); what is stored from it stays",
                         unreachable=True), None
        return _Read(stat, reason=failure_reason(stat.path, exc)), None
    with naming_warnings(stat.path):  # Pillow's warnings on odd EXIF data name the file
        read = _Read(stat, digest, meta=read_meta(data, stat.mtime_ns))
    if digest not in known:
        try:
            read.image = load_image(stat.path, preprocessing, reduced_decode=reduced_decode, data=data)
        except ImageLoadError as exc:
            read.reason = str(exc)
            return read, None
    return read, data


# the errno values of storage that does not answer (a network drive, a failing disk), as opposed to a file that
# is gone, forbidden or not a picture; pyarrow's S3 errors carry no errno but name their kind
_UNREACHABLE = {getattr(errno, name) for name in ("EIO", "ETIMEDOUT", "ECONNRESET", "ECONNREFUSED", "ECONNABORTED",
                                                  "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN", "ESTALE", "ENOTCONN")
                if hasattr(errno, name)}
_UNREACHABLE_S3 = ("NETWORK_CONNECTION", "REQUEST_TIMEOUT", "SERVICE_UNAVAILABLE", "SLOW_DOWN", "THROTTLING",
                   "INTERNAL_FAILURE")  # not ACCESS_DENIED, NO_SUCH_KEY: those are the file's, and stay
UNREACHABLE_REASON = "cannot be read now"


def _unreachable(exc: OSError) -> bool:
    return exc.errno in _UNREACHABLE or (exc.errno is None and any(kind in str(exc) for kind in _UNREACHABLE_S3))


def _file_record(read: _Read) -> FileRecord:
    stat, meta = read.stat, read.meta
    return FileRecord(stat.path, stat.size, stat.mtime_ns, read.digest, meta.taken, meta.camera, True)


def _same_input(a, b) -> bool:
    return a.to_dict() == b.to_dict()


class _Uncaptioned:
    """Which contents a run's captioner still has to caption: all but those it captioned (in this run or
    before). Thread-safe enough for the workers' `in` tests: the main thread only removes."""

    def __init__(self, captioned: dict[str, str], captioner: str | None):
        self.captioner = captioner
        self.captioned = {d for d, by in captioned.items() if by == captioner}

    def __contains__(self, digest: str) -> bool:
        return self.captioner is not None and digest not in self.captioned

    def done(self, digest: str) -> None:
        self.captioned.add(digest)


def skip_file(path: str, reason: str, options: IndexOptions, summary: IndexSummary) -> None:
    summary.skipped.append((path, reason))
    if options.on_skip:
        options.on_skip(path, reason)
