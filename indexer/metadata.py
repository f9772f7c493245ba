"""When a photo was taken and with which camera, read from its EXIF header at index time.

Dates are **wall-clock seconds**: the time a clock showed where the photo was taken, counted in seconds
from 1970-01-01 as if that clock ran on UTC. EXIF dates carry no zone in most files (OffsetTimeOriginal,
0x9011, exists only since EXIF 2.31 and many cameras leave it out), and someone who looks for "May 4th"
means the date the camera showed. A file without a usable EXIF date falls back to its modification time,
an instant, which is turned into the wall-clock of the indexing machine's local zone (with the daylight
saving of that instant), so that both kinds of date compare. OffsetTimeOriginal is ignored: applying it to
the files that have one would put them on UTC and leave the rest on wall-clock.

Only the header is read (Pillow opens lazily), never the pixels, and bad metadata never raises: a date
that cannot be read falls back to the next tag, then to the mtime.
"""

from __future__ import annotations

import calendar
import io
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from PIL import Image

from .images import setup_pillow

log = logging.getLogger(__name__)

EXIF_IFD = 0x8769  # pointer from IFD0 to the Exif sub-IFD
MAKE, MODEL, DATE_TIME = 0x010F, 0x0110, 0x0132  # IFD0 tags
DATE_TIME_ORIGINAL, DATE_TIME_DIGITIZED = 0x9003, 0x9004  # Exif IFD tags
DATE_TAGS = (DATE_TIME_ORIGINAL, DATE_TIME_DIGITIZED, DATE_TIME)  # in order of preference
# Years a photo can have been taken in: the first photograph is from 1826; later ones are clock errors.
FIRST_YEAR, LAST_YEAR = 1826, 2100
# "YYYY:MM:DD HH:MM:SS" as EXIF writes it; dashes, a missing time and a fraction of a second also occur.
_EXIF_DATE = re.compile(r"(\d{4})[:-](\d{2})[:-](\d{2})(?:[ T](\d{2}):(\d{2}):(\d{2})(?:\.\d*)?)?")


@dataclass(frozen=True)
class FileMeta:
    """What the index keeps about a photo besides its pixels; every date is wall-clock seconds (see above)."""

    taken: int | None  # EXIF DateTimeOriginal, else DateTimeDigitized, else IFD0 DateTime; None where none is usable
    source: Literal["exif", "mtime"]  # where `date` comes from
    camera: str | None  # "Make Model", e.g. "Canon EOS 5D"; None where EXIF names neither
    date: int  # the one number to filter and sort by: `taken`, else the mtime as local wall-clock


def read_meta(data: bytes, mtime_ns: int) -> FileMeta:
    """The metadata of a file whose bytes are `data` and whose modification time is `mtime_ns`."""
    tags = _exif_tags(data)
    taken, camera = _taken(tags), _camera(tags)
    if taken is None:
        return FileMeta(None, "mtime", camera, local_wall_clock(mtime_ns))
    return FileMeta(taken, "exif", camera, taken)


def local_wall_clock(mtime_ns: int) -> int:
    """An instant (ns since the epoch) as wall-clock seconds of this machine's local zone at that instant."""
    seconds = mtime_ns // 1_000_000_000
    return seconds + time.localtime(seconds).tm_gmtoff


def _exif_tags(data: bytes) -> dict[int, object]:
    """The raw values of the tags we read (IFD0's and the Exif IFD's numbers do not overlap); {} without EXIF."""
    try:
        setup_pillow()  # HEIC/HEIF, whether or not a picture was decoded before
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "PNG" and "exif" not in image.info:
                return {}  # Pillow would decode every pixel looking for an eXIf chunk after the image data
            exif = image.getexif()
            tags = {tag: exif.get(tag) for tag in (MAKE, MODEL, DATE_TIME)}  # IFD0
            exif_ifd = exif.get_ifd(EXIF_IFD)
            return tags | {tag: exif_ifd.get(tag) for tag in (DATE_TIME_ORIGINAL, DATE_TIME_DIGITIZED)}
    except Exception as exc:  # not an image, or a header Pillow cannot parse: many exception types
        log.debug("no EXIF read: %s: %s", type(exc).__name__, exc)
        return {}


def _text(value: object) -> str | None:
    """An EXIF text up to its first NUL (C string), stripped; None where empty or not text."""
    if isinstance(value, bytes):  # written with type UNDEFINED instead of ASCII
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    return value.split("\0", 1)[0].strip() or None


def _taken(tags: dict[int, object]) -> int | None:
    """The first usable date of DATE_TAGS: a camera may write a broken DateTimeOriginal and a good DateTime."""
    for tag in DATE_TAGS:
        seconds = _exif_seconds(tags.get(tag))
        if seconds is not None:
            return seconds
    return None


def _exif_seconds(value: object) -> int | None:
    """An EXIF date as wall-clock seconds, or None where absent, blank, malformed or out of FIRST..LAST_YEAR."""
    text = _text(value)
    match = _EXIF_DATE.fullmatch(text) if text else None
    if match is None:
        if text:
            log.debug("unusable EXIF date %r", text)
        return None
    parts = [int(part) for part in match.groups(default="0")]
    try:
        datetime(*parts)  # day 32, month 13, hour 24... raise ValueError
    except ValueError:
        log.debug("invalid EXIF date %r", text)
        return None
    if not FIRST_YEAR <= parts[0] <= LAST_YEAR:
        log.debug("EXIF date %r out of %d..%d", text, FIRST_YEAR, LAST_YEAR)
        return None
    return calendar.timegm(tuple(parts))


def _camera(tags: dict[int, object]) -> str | None:
    """"Make Model", without the make twice where the model already starts with it ("Canon Canon EOS 5D")."""
    make, model = _text(tags.get(MAKE)), _text(tags.get(MODEL))
    if make and model and model.casefold().startswith(make.casefold()):
        return model
    return " ".join(part for part in (make, model) if part) or None
