"""Which files the server hands out, and their thumbnails.

Only indexed files are served: a path is looked up in the index (never joined to a folder), and its real
location must be a file the scan would index (an image's name, not hidden) in a folder that holds indexed
files (followed through symlinks as the scan followed them), or its bytes must still be the indexed content
(a link into a store of files, as git-annex keeps them), so a link swapped in to point elsewhere
(`/etc/passwd`, a text file beside the photos) is refused; an `s3://` object is opened as the index names it
(object storage has no links). Thumbnails are JPEGs of at most `THUMB_SIDE` pixels, EXIF-oriented, cached on
disk by content hash (made in memory for each request where that cache cannot be written).
"""

from __future__ import annotations

import io
import logging
import os
import stat
import threading
from pathlib import Path
from typing import BinaryIO

from blipsearch.indexer.images import check_header, exif_turn, failure_reason, to_rgb
from blipsearch.indexer.objects import is_remote
from blipsearch.indexer.scan import file_hash, open_regular, read_hashed, supported_extensions

from ..api import Index, NotIndexedError
from ..errors import BlipsearchError, ImageLoadError, printable

log = logging.getLogger(__name__)

THUMB_SIDE = 320  # pixels: sharp in a ~160 px tile on a 2x screen, a few KB as JPEG
THUMB_QUALITY = 80


class UnservableError(BlipsearchError):
    """An indexed file that cannot be read or decoded now (changed on disk since it was indexed)."""


class ServedFiles:
    """Opens indexed files for serving; keeps the real folders of one index generation."""

    def __init__(self, index: Index, cache: Path):
        self.index, self.cache = index, cache
        self._folders: tuple[object, frozenset[str]] | None = None  # (reader, real folders)
        self._cache_refused = False  # said once: the thumbnail cache cannot be written

    def open(self, path: str) -> BinaryIO:
        """The indexed file `path`, opened; raises `NotIndexedError` (unknown, or leads out) or
        `UnservableError` (no longer a file that can be read).

        A file whose real location lies outside the indexed folders (a link into a store of files, as
        git-annex keeps them), or is no file the scan would index there, is served only where its bytes are
        still the indexed content: read whole and hashed, so a link swapped to point elsewhere is refused."""
        _, digest = self.index.indexed(path)
        if is_remote(path):  # an object the index names (object storage has no links to follow)
            try:
                return open_regular(path)
            except (OSError, ImageLoadError) as exc:
                raise _changed(path, exc, "read") from exc
        real = os.path.realpath(path)
        name = os.path.basename(real)
        if os.path.dirname(real) in self._real_folders() and not name.startswith(".") \
                and os.path.splitext(name)[1].lower() in supported_extensions():
            try:
                return open_regular(real)
            except FileNotFoundError as exc:
                raise NotIndexedError(f"{printable(path)} cannot be read: {exc.strerror}") from exc
            except (OSError, ImageLoadError) as exc:  # a folder or a FIFO in its place, permission denied
                raise _changed(path, exc, "read") from exc
        # outside: nothing about the target is told but "leads out", unless it holds the indexed bytes (hashed
        # from the descriptor that is then served: a link swapped meanwhile changes nothing)
        leads_out = NotIndexedError(f"{printable(path)} leads out of the indexed folders")
        try:
            if not stat.S_ISREG(os.stat(real).st_mode):
                raise leads_out
            file = open_regular(real)
        except (OSError, ImageLoadError):
            raise leads_out from None
        try:
            if file_hash(file) != digest:
                raise leads_out
            file.seek(0)
        except OSError:
            file.close()
            raise leads_out from None
        except BaseException:
            file.close()
            raise
        return file

    def thumbnail(self, path: str) -> Path | bytes:
        """A cached JPEG of the indexed image at `path` (made on first request), or the JPEG's bytes where the
        cache cannot be written; raises as `open` does.

        Cached by the hash of the bytes it was made from: a file changed since it was indexed gets its own
        thumbnail, never one filed under the indexed content's hash (which its copies share)."""
        _, digest = self.index.indexed(path)
        with self.open(path) as file:  # still there, and no link leading out (a cached thumbnail outlived them)
            target = self._cached(digest)
            if target.exists() and self._as_indexed(path, digest, file):
                return target
            try:
                check_header(file, path)  # no image, or a decompression bomb: refused before reading it whole
                data, actual = read_hashed(file)
            except (OSError, ImageLoadError) as exc:
                raise _changed(path, exc) from exc
        target = self._cached(actual)
        if target.exists():
            return target
        jpeg = _thumbnail_jpeg(data, path)
        try:
            _store(jpeg, target)
        except OSError as exc:
            if not self._cache_refused:
                log.warning("the thumbnail cache %s cannot be written (%s): thumbnails are made for each request",
                            self.cache, exc.strerror or exc)
                self._cache_refused = True
            return jpeg
        return target

    def _as_indexed(self, path: str, digest: str, file: BinaryIO) -> bool:
        """The open file has the size (and, on a disk, the modification time) it was indexed with: its
        thumbnail is the one filed under the indexed content's hash."""
        known = next((f for f in self.index.reader.files_by_hash([digest])[digest] if f.path == path), None)
        if known is None:
            return False
        if is_remote(path):
            return file.size() == known.size
        status = os.fstat(file.fileno())
        return (status.st_size, status.st_mtime_ns) == (known.size, known.mtime_ns)

    def _cached(self, digest: str) -> Path:
        return self.cache / digest[:2] / f"{digest}-{THUMB_SIDE}.jpg"

    def _real_folders(self) -> frozenset[str]:
        reader = self.index.reader
        if self._folders is None or self._folders[0] is not reader:
            folders = {os.path.dirname(p) for p in reader.files()}
            self._folders = (reader, frozenset(os.path.realpath(f) for f in folders))
        return self._folders[1]


def _thumbnail_jpeg(data: bytes, path: str) -> bytes:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            turn = exif_turn(image)  # read as the indexer reads it
            image.draft("RGB", (THUMB_SIDE, THUMB_SIDE))  # JPEG: decode at a reduced scale
            image.thumbnail((THUMB_SIDE, THUMB_SIDE))
            small = to_rgb(image)
            out = io.BytesIO()
            (small if turn is None else small.transpose(turn)).save(out, "JPEG", quality=THUMB_QUALITY,
                                                                    optimize=True)
    except Exception as exc:  # Pillow signals bad data with many exception types
        raise _changed(path, exc) from exc
    return out.getvalue()


def _store(jpeg: bytes, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(jpeg)
        tmp.replace(target)  # concurrent makers write the same bytes; a reader never sees half a file
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _changed(path: str, exc: BaseException, what: str = "decoded") -> UnservableError:
    reason = str(exc) if isinstance(exc, ImageLoadError) else failure_reason(path, exc)
    return UnservableError(f"{printable(path)} cannot be {what} now ({reason}); it changed since it was "
                           "indexed: run `blipsearch index` again")
