"""Pictures in object storage (`s3://bucket/prefix`): listing them and opening one, through pyarrow's S3 file
system, which reads the usual AWS environment (credentials, AWS_REGION, AWS_ENDPOINT_URL).

An object's path in the index is its full address, `s3://bucket/key`; its size and last-modified time play
the part of a file's size and mtime in change detection.
"""

from __future__ import annotations

import functools
from typing import BinaryIO

from blipsearch.retrieval.errors import ImageLoadError, InvalidInputError, first_line

SCHEME = "s3://"


def is_remote(path: str) -> bool:
    return path.startswith(SCHEME)


@functools.cache
def _filesystem(bucket: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(f"{SCHEME}{bucket}")[0]


def _split(url: str) -> tuple[str, str]:
    bucket, _, key = url[len(SCHEME):].partition("/")
    return bucket, key


def check_prefix(url: str, allow_empty: bool = False) -> str:
    """`url` without a trailing slash; `InvalidInputError` where nothing is stored under it (unless
    `allow_empty`: the bucket must still be there)."""
    url = url.rstrip("/")
    bucket, key = _split(url)
    if not bucket:
        raise InvalidInputError(f"{url}: names no bucket; use s3://bucket/prefix")
    from pyarrow import fs

    try:
        info = _filesystem(bucket).get_file_info(f"{bucket}/{key}" if key else bucket)
    except (OSError, ValueError) as exc:  # pyarrow: OSError from S3, ArrowInvalid (a ValueError) from the URI
        raise InvalidInputError(f"{url}: cannot be listed ({first_line(exc)}); check the address, "
                                "AWS_ENDPOINT_URL and the credentials") from exc
    if info.type == fs.FileType.NotFound:
        if not (allow_empty and key):
            raise InvalidInputError(f"{url}: no such object or prefix")
        check_prefix(f"{SCHEME}{bucket}")  # an emptied prefix is gone, but its bucket must be there
    return url


def list_prefix(url: str) -> list[tuple[str, int, int]]:
    """(address, size, mtime_ns) of every object below `url` (or of the object itself), hidden names skipped."""
    from pyarrow import fs

    bucket, key = _split(url)
    filesystem = _filesystem(bucket)
    base = f"{bucket}/{key}" if key else bucket
    try:
        info = filesystem.get_file_info(base)
        found = [info] if info.type == fs.FileType.File else [] if info.type == fs.FileType.NotFound else \
            filesystem.get_file_info(fs.FileSelector(base, recursive=True))
    except OSError as exc:
        raise InvalidInputError(f"{url}: cannot be listed ({first_line(exc)}); check the credentials and run "
                                "again") from exc
    out = []
    for item in found:
        below = item.path[len(base):].lstrip("/").split("/")
        if item.type != fs.FileType.File or any(part.startswith(".") for part in below if part):
            continue
        out.append((SCHEME + item.path, item.size, item.mtime_ns or 0))
    return sorted(out)


def open_object(path: str, max_bytes: int) -> BinaryIO:
    """A seekable reader of one object; `ImageLoadError` where it is larger than `max_bytes`."""
    bucket, key = _split(path)
    reader = _filesystem(bucket).open_input_file(f"{bucket}/{key}")
    if reader.size() > max_bytes:
        reader.close()
        raise ImageLoadError(f"file too large ({reader.size() / (1 << 30):,.1f} GiB)")
    return reader
