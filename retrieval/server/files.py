"""Which files the server hands out, and their thumbnails.

Only indexed files are served: a path is looked up in the index (never joined to a folder), and its real
location must lie in a folder that holds indexed files (followed through symlinks as the scan followed
them), or its bytes must still be the indexed content (a link into a store of files, as git-annex keeps
them), so a link swapped in to point elsewhere (`/etc/passwd`) is refused. Thumbnails are JPEGs of at most
`THUMB_SIDE` pixels, EXIF-oriented, cached on disk by content hash.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import threading
from pathlib import Path
from typing import BinaryIO

from blipsearch.indexer.images import check_header, to_rgb
from blipsearch.indexer.scan import file_hash, open_regular, read_hashed

from ..api import Index, NotIndexedError
from ..errors import ImageLoadError, printable

log = logging.getLogger(__name__)

THUMB_SIDE = 320  # pixels: sharp in a ~160 px tile on a 2x screen, a few KB as JPEG
THUMB_QUALITY = 80


class ServedFiles:
    """Opens indexed files for serving; keeps the real folders of one index generation."""

    def __init__(self, index: Index, cache: Path):
        self.index, self.cache = index, cache
        self._folders: tuple[object, frozenset[str]] | None = None  # (reader, real folders)

    def open(self, path: str) -> BinaryIO:
        """The indexed file `path`, opened; raises `NotIndexedError` (unknown, or leads out) or `ImageLoadError`.

        A file whose real location lies outside the indexed folders (a link into a store of files, as
        git-annex keeps them) is served only where its bytes are still the indexed content: read whole and
        hashed, so a link swapped to point elsewhere is refused."""
        _, digest = self.index.indexed(path)
        real = os.path.realpath(path)
        if os.path.dirname(real) in self._real_folders():
            try:
                return open_regular(real)
            except OSError as exc:
                raise NotIndexedError(f"{printable(path)} cannot be read: {exc.strerror}") from exc
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

    def thumbnail(self, path: str) -> Path:
        """A cached JPEG of the indexed image at `path` (made on first request).

        Cached by the hash of the bytes it was made from: a file changed since it was indexed gets its own
        thumbnail, never one filed under the indexed content's hash (which its copies share)."""
        _, digest = self.index.indexed(path)
        target = self._cached(digest)
        if target.exists():
            return target
        with self.open(path) as file:
            check_header(file, path)  # no image, or a decompression bomb: refused before reading it whole
            data, actual = read_hashed(file)
        target = self._cached(actual)
        if not target.exists():
            _write_thumbnail(io.BytesIO(data), path, target)
        return target

    def _cached(self, digest: str) -> Path:
        return self.cache / digest[:2] / f"{digest}-{THUMB_SIDE}.jpg"

    def _real_folders(self) -> frozenset[str]:
        reader = self.index.reader
        if self._folders is None or self._folders[0] is not reader:
            folders = {os.path.dirname(p) for p in reader.files()}
            self._folders = (reader, frozenset(os.path.realpath(f) for f in folders))
        return self._folders[1]


def _write_thumbnail(file: BinaryIO, path: str, target: Path) -> None:
    from PIL import Image, ImageOps

    check_header(file, path)  # no image, or a decompression bomb: ImageLoadError
    file.seek(0)
    try:
        with Image.open(file) as image:
            image.draft("RGB", (THUMB_SIDE, THUMB_SIDE))  # JPEG: decode at a reduced scale
            small = ImageOps.exif_transpose(image)
            small.thumbnail((THUMB_SIDE, THUMB_SIDE))
            small = to_rgb(small)
    except (OSError, ValueError) as exc:
        raise ImageLoadError(f"cannot decode: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
    small.save(tmp, "JPEG", quality=THUMB_QUALITY, optimize=True)
    tmp.replace(target)  # concurrent makers write the same bytes; a reader never sees half a file
