"""Find image files under folders, and fingerprint their content."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from blipsearch.retrieval.errors import InvalidInputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
HEIF_EXTENSIONS = frozenset({".heic", ".heif"})


def supported_extensions() -> frozenset[str]:
    """Pillow's formats we index, plus HEIC/HEIF when pillow-heif is installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return IMAGE_EXTENSIONS
    register_heif_opener()
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


def resolve_roots(roots: Iterable[str | Path]) -> list[Path]:
    """Absolute folders (or single files); a missing one is an error, never 'everything was deleted'."""
    resolved = []
    for root in roots:
        path = Path(root).expanduser()
        if not path.exists():
            raise InvalidInputError(f"{root}: no such file or folder")
        resolved.append(path.resolve())
    return resolved


def scan(roots: Iterable[Path], extensions: frozenset[str] | None = None) -> ScanResult:
    """Every image file below `roots`, recursively, in sorted order; hidden files and folders are skipped."""
    extensions = extensions or supported_extensions()
    result = ScanResult()
    seen: set[str] = set()
    for root in roots:
        for path in _walk(root, result.unreadable_dirs):
            if Path(path).suffix.lower() not in extensions or path in seen:
                continue
            seen.add(path)
            if not _utf8(path):
                result.skipped.append((path.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
                                       "file name is not valid UTF-8; rename the file"))
                continue
            try:
                st = os.stat(path)
            except OSError:
                st = None  # broken link or vanished: let the loader report it
            result.files.append(FileStat(path, st.st_size if st else 0, st.st_mtime_ns if st else 0))
    result.files.sort(key=lambda f: f.path)
    return result


def _walk(root: Path, unreadable: list[str]) -> Iterator[str]:
    if root.is_file():
        yield str(root)
        return

    def on_error(exc: OSError) -> None:
        log.warning("cannot read folder %s: %s", exc.filename, exc.strerror)
        unreadable.append(str(exc.filename))

    for folder, dirs, files in os.walk(root, onerror=on_error):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith("."):
                yield os.path.join(folder, name)


def content_hash(path: str | Path) -> str:
    """128-bit BLAKE2b of the bytes: the identity of an image across moves, renames and copies."""
    return hash_bytes(Path(path).read_bytes())


def hash_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # bytes the file system gave that are no UTF-8 (old archives, Samba)
        return False
    return True


def is_under(path: str, folders: Iterable[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)
