"""Find image files under folders, and read and fingerprint their content safely.

Only regular files are read: a FIFO, a device or a socket (or a link to one) could block a read forever or
never end (`/dev/zero`). A scan skips them by their status; `open_regular` checks the opened descriptor
again, so a file swapped for one between the scan and the read is refused too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from blipsearch.retrieval.errors import ImageLoadError, InvalidInputError, printable

from . import objects

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
HEIF_EXTENSIONS = frozenset({".heic", ".heif"})
# Larger files are skipped unread. 1 GiB holds any 8-bit RGBA image under the decompression-bomb limit
# stored uncompressed (179 megapixels x 4 bytes = 716 MB); photos are far smaller.
MAX_FILE_BYTES = 1 << 30
READ_CHUNK = 1 << 20  # bytes per read() of a streamed hash
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def supported_extensions() -> frozenset[str]:
    """Pillow's formats we index, plus HEIC/HEIF when pillow-heif is installed (images.py registers it)."""
    if importlib.util.find_spec("pillow_heif") is None:
        return IMAGE_EXTENSIONS
    return IMAGE_EXTENSIONS | HEIF_EXTENSIONS


@dataclass(frozen=True)
class FileStat:
    path: str  # absolute
    size: int  # bytes
    mtime_ns: int


@dataclass
class ScanResult:
    files: list[FileStat] = field(default_factory=list)
    unreadable_dirs: list[str] = field(default_factory=list)  # their contents are neither added nor removed
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): found but not indexable
    dangling: list[str] = field(default_factory=list)  # links whose target is gone (an unplugged drive?)


def resolve_roots(roots: Iterable[str | Path], allow_empty: bool = False) -> list[Path | str]:
    """Absolute folders (or single files), and `s3://` prefixes as given (objects.py); a missing one is an error,
    never 'everything was deleted', unless `allow_empty` (a deleted folder: its stored files then go). An
    `s3://` prefix with nothing under it is missing too (object storage keeps no empty folders: an emptied
    prefix is gone)."""
    resolved = []
    for root in roots:
        if not str(root).strip():  # `index "$UNSET"`: not the current folder
            raise InvalidInputError("a folder argument is empty; name the folder (`.` for the current one)")
        if objects.is_remote(str(root)):
            resolved.append(objects.check_prefix(str(root), allow_empty))
            continue
        path = Path(os.path.expanduser(root))  # (Path.expanduser raises for an unknown ~user)
        if not path.exists() and not allow_empty:
            raise InvalidInputError(f"{root}: " + (
                "this link leads nowhere now (its target is gone: an unplugged drive?); plug it in again, or let "
                "--allow-empty remove what the index holds from it" if path.is_symlink() else
                "no such file or folder (if it was deleted, --allow-empty removes what the index holds from it)"))
        resolved.append(path.resolve())  # (a deleted one too: through the links above it, as the index names it)
    return resolved


def scan(roots: Iterable[Path | str], extensions: frozenset[str] | None = None) -> ScanResult:
    """Every image file below `roots`, recursively, in sorted order; hidden files and folders are skipped.

    Links to folders are followed, except one that leads back to a folder it is inside of (a loop). An
    `s3://` root lists the objects below it.
    """
    extensions = extensions or supported_extensions()
    result = ScanResult()
    seen: set[str] = set()
    for root in roots:
        if objects.is_remote(str(root)):
            _scan_prefix(str(root), extensions, seen, result)
            continue
        for path in _walk(Path(root), result):
            if Path(path).suffix.lower() not in extensions or path in seen:
                continue
            seen.add(path)
            reason = _unreadable_name(path)
            st = None if reason else _stat(path)
            reason = reason or (file_problem(st) if st else None)
            if reason:
                result.skipped.append((printable(path), reason))
            else:  # a broken link or a vanished file (no status) is the loader's to report
                result.files.append(FileStat(path, st.st_size if st else 0, _mtime_ns(st) if st else 0))
    result.files.sort(key=lambda f: f.path)
    return result


def _scan_prefix(url: str, extensions: frozenset[str], seen: set[str], result: ScanResult) -> None:
    for path, size, mtime_ns in objects.list_prefix(url):
        if Path(path).suffix.lower() not in extensions or path in seen:
            continue
        seen.add(path)
        if size > MAX_FILE_BYTES:
            result.skipped.append((path, f"file too large ({_size(size)}; the limit is {_size(MAX_FILE_BYTES)})"))
        else:
            result.files.append(FileStat(path, size, mtime_ns))


def _mtime_ns(st: os.stat_result) -> int:
    """The modification time, within the index's int64 nanoseconds (years 1677 to 2262): a file dated beyond
    (a camera's clock gone wrong) failed every run that met it."""
    return min(max(st.st_mtime_ns, -(1 << 63)), (1 << 63) - 1)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def file_problem(st: os.stat_result) -> str | None:
    """Why a file with this status is not read, or None for a regular file within the size limit."""
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "of an unknown kind")
        return f"not a regular file ({kind})"
    if st.st_size > MAX_FILE_BYTES:
        return f"file too large ({_size(st.st_size)}; the limit is {_size(MAX_FILE_BYTES)})"
    return None


def _size(count: int) -> str:
    return f"{count / (1 << 30):,.1f} GiB" if count >= 1 << 30 else f"{count / (1 << 20):,.1f} MiB"


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file within the size limit for reading; else raise `ImageLoadError` with the reason.

    O_NONBLOCK: opening a FIFO swapped in since the scan returns at once instead of waiting for a writer;
    the status of the open descriptor, not of the name, decides. An `s3://` address opens the object.
    """
    if objects.is_remote(str(path)):
        return objects.open_object(str(path), MAX_FILE_BYTES)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        reason = file_problem(os.fstat(fd))
        if reason:
            raise ImageLoadError(reason)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_hashed(file: BinaryIO) -> tuple[bytes, str]:
    """All of `file` from its start, in one buffer (decoders read it without a copy), and its content hash."""
    file.seek(0)
    data = file.read()
    if len(data) > MAX_FILE_BYTES:
        raise ImageLoadError(file_problem(os.fstat(file.fileno())) or "file grew while being read")
    return data, hash_bytes(data)


def content_hash(path: str | Path) -> str:
    """128-bit BLAKE2b of the bytes: the identity of an image across moves, renames and copies."""
    with open_regular(path) as file:
        return file_hash(file)


def file_hash(file: BinaryIO) -> str:
    """`content_hash` of an open file, read from where it stands, a chunk at a time."""
    hasher = _hasher()
    while chunk := file.read(READ_CHUNK):
        hasher.update(chunk)
    return hasher.hexdigest()


def hash_bytes(data: bytes) -> str:
    hasher = _hasher()
    hasher.update(data)
    return hasher.hexdigest()


def _hasher():
    return hashlib.blake2b(digest_size=16)


def _walk(root: Path, result: ScanResult) -> Iterator[str]:
    if root.is_file():
        yield str(root)
    elif not os.path.lexists(root):  # deleted, and named with --allow-empty (resolve_roots): nothing is there
        return
    else:
        yield from _walk_folder(str(root), {}, result)


def _walk_folder(folder: str, above: dict[tuple[int, int], str], result: ScanResult) -> Iterator[str]:
    """Paths of the files below `folder`; `above` maps the (device, inode) of each folder it is inside of. A
    folder that cannot be listed counts as skipped (the run then ends with exit status 3), and what is
    stored from it stays."""
    try:
        st = os.stat(folder)
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as exc:
        result.unreadable_dirs.append(folder)
        result.skipped.append((printable(folder), f"cannot read this folder ({exc.strerror}); its files are "
                                                  "neither added nor removed"))
        return
    above = {**above, (st.st_dev, st.st_ino): folder}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_folder = entry.is_dir()  # follows links: a link to a file, and a broken link, are files here
        except OSError as exc:  # a link that cannot be followed: a loop of links, a dead mount, no permission
            result.unreadable_dirs.append(entry.path)  # a file or folder: what is stored from it stays
            result.skipped.append((printable(entry.path), f"cannot follow this link ({exc.strerror}); what is "
                                                          "stored from it stays"))
            continue
        if not is_folder and entry.is_symlink() and not os.path.exists(entry.path):
            result.dangling.append(entry.path)  # the run decides, by what it stores from it (pipeline.plan)
        elif not is_folder:
            yield entry.path
        elif (loop := _loop(entry, above)) is not None:
            log.warning("not following %s: it leads back to %s, which holds it (a loop)", entry.path, loop)
        else:
            yield from _walk_folder(entry.path, above, result)


def _loop(entry: os.DirEntry, above: dict[tuple[int, int], str]) -> str | None:
    try:
        st = entry.stat()
    except OSError:
        return None  # gone since the listing: reading it will say so
    return above.get((st.st_dev, st.st_ino))


def _unreadable_name(path: str) -> str | None:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # bytes the file system gave that are no UTF-8 (old archives, Samba)
        return "file name is not valid UTF-8; rename the file"
    return None


def is_under(path: str, folders: Iterable[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)
