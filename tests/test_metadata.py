"""Photo dates and cameras from EXIF headers written with Pillow, including the odd values cameras write."""

import time
from calendar import timegm
from io import BytesIO

import pytest
from PIL import Image, ImageFile

from blipsearch.indexer.metadata import FileMeta, read_meta

EXIF_IFD = 0x8769
MAKE, MODEL, DATE_TIME = 0x010F, 0x0110, 0x0132
ORIGINAL, DIGITIZED, SUBSEC_ORIGINAL, OFFSET_ORIGINAL = 0x9003, 0x9004, 0x9291, 0x9011
BERLIN = "CET-1CEST,M3.5.0,M10.5.0/3"  # POSIX rule: needs no tz database
MTIME_NS = timegm((2019, 1, 15, 12, 0, 0)) * 10**9  # a winter instant: 13:00 in Berlin


def wall(*parts: int) -> int:
    return timegm((*parts, 0, 0, 0, 0, 0, 0)[:6])


def photo(ifd0: dict | None = None, exif_ifd: dict | None = None, fmt: str = "JPEG") -> bytes:
    """A tiny picture in `fmt` whose EXIF holds the given IFD0 and Exif-IFD tags; no EXIF at all without tags."""
    exif = Image.Exif()
    exif.update(ifd0 or {})
    exif.get_ifd(EXIF_IFD).update(exif_ifd or {})
    out = BytesIO()
    Image.new("RGB", (8, 8), "white").save(out, fmt, **({"exif": exif.tobytes()} if ifd0 or exif_ifd else {}))
    return out.getvalue()


@pytest.fixture
def berlin(monkeypatch):
    monkeypatch.setenv("TZ", BERLIN)
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_date_time_original_comes_first_then_digitized_then_date_time():
    dates = {ORIGINAL: "2019:05:04 10:11:12", DIGITIZED: "2019:05:04 10:11:13"}
    assert read_meta(photo({DATE_TIME: "2020:01:01 00:00:00"}, dates), MTIME_NS) == FileMeta(
        taken=wall(2019, 5, 4, 10, 11, 12), source="exif", camera=None, date=wall(2019, 5, 4, 10, 11, 12))
    assert read_meta(photo({DATE_TIME: "2020:01:01 00:00:00"}, {DIGITIZED: "2019:05:04 10:11:13"}),
                     MTIME_NS).taken == wall(2019, 5, 4, 10, 11, 13)
    assert read_meta(photo({DATE_TIME: "2020:01:01 00:00:00"}), MTIME_NS).taken == wall(2020, 1, 1)


@pytest.mark.parametrize("value, taken", [
    ("2019:05:04 10:11:12\0\0", wall(2019, 5, 4, 10, 11, 12)),  # trailing NULs
    (b"2019:05:04 10:11:12\0", wall(2019, 5, 4, 10, 11, 12)),  # bytes: written with type UNDEFINED
    ("2019-05-04 10:11:12", wall(2019, 5, 4, 10, 11, 12)),  # dashes
    ("2019:05:04 10:11:12.123", wall(2019, 5, 4, 10, 11, 12)),  # fraction of a second, dropped
    ("2019:05:04", wall(2019, 5, 4)),  # no time: midnight
    ("  2019:05:04 10:11:12  ", wall(2019, 5, 4, 10, 11, 12)),
    ("1826:01:01 00:00:00", wall(1826, 1, 1)),  # the first and last years accepted
    ("2100:12:31 23:59:59", wall(2100, 12, 31, 23, 59, 59)),
])
def test_odd_but_readable_dates_are_read(value, taken):
    meta = read_meta(photo({DATE_TIME: "2001:02:03 04:05:06"}, {ORIGINAL: value}), MTIME_NS)
    assert (meta.taken, meta.source, meta.date) == (taken, "exif", taken)


@pytest.mark.parametrize("value", [
    "0000:00:00 00:00:00", "    :  :     :  :  ", "", "\0\0\0", "2019:13:04 10:11:12", "2019:05:32 10:11:12",
    "2019:02:29 10:11:12", "2019:05:04 24:00:00", "1825:12:31 23:59:59", "2101:01:01 00:00:00", "unknown",
    "2019:05:04 10:11:12 and more", b"\xff\xfe",
])
def test_an_unusable_date_falls_back_to_the_next_tag(value):
    meta = read_meta(photo({DATE_TIME: "2001:02:03 04:05:06"}, {ORIGINAL: value, DIGITIZED: value}), MTIME_NS)
    assert (meta.taken, meta.source) == (wall(2001, 2, 3, 4, 5, 6), "exif")


def test_sub_seconds_and_the_zone_offset_leave_the_wall_clock_alone():
    exif_ifd = {ORIGINAL: "2019:05:04 10:11:12", SUBSEC_ORIGINAL: "987", OFFSET_ORIGINAL: "+02:00"}
    assert read_meta(photo(exif_ifd=exif_ifd), MTIME_NS).taken == wall(2019, 5, 4, 10, 11, 12)


@pytest.mark.usefixtures("berlin")
@pytest.mark.parametrize("mtime, local", [
    ((2019, 1, 15, 12, 0, 0), (2019, 1, 15, 13, 0, 0)),  # CET, UTC+1
    ((2019, 7, 1, 12, 0, 0), (2019, 7, 1, 14, 0, 0)),  # CEST, UTC+2
    ((2019, 12, 31, 23, 30, 0), (2020, 1, 1, 0, 30, 0)),  # already next year on the wall clock
])
def test_without_a_usable_date_the_mtime_becomes_local_wall_clock(mtime, local):
    data = photo({DATE_TIME: "0000:00:00 00:00:00", MAKE: "Canon"})
    meta = read_meta(data, timegm(mtime) * 10**9 + 999_999_999)  # a fraction of a second is dropped
    assert meta == FileMeta(taken=None, source="mtime", camera="Canon", date=wall(*local))


@pytest.mark.usefixtures("berlin")
@pytest.mark.parametrize("data", [b"", b"not an image at all", photo()[:20], photo(), photo(fmt="PNG"),
                                  photo({0x0131: "an editor"})])  # EXIF without a date
def test_no_exif_falls_back_to_the_mtime(data):
    assert read_meta(data, MTIME_NS) == FileMeta(taken=None, source="mtime", camera=None, date=wall(2019, 1, 15, 13))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_is_read_from_other_formats(fmt):
    meta = read_meta(photo({MAKE: "Apple", MODEL: "iPhone 12"}, {ORIGINAL: "2019:05:04 10:11:12"}, fmt), MTIME_NS)
    assert (meta.taken, meta.camera) == (wall(2019, 5, 4, 10, 11, 12), "Apple iPhone 12")


def test_exif_is_read_from_heic():
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()  # to write the test file; read_meta registers it for itself
    meta = read_meta(photo({MAKE: "Apple", MODEL: "iPhone 12"}, {ORIGINAL: "2019:05:04 10:11:12"}, "HEIF"), MTIME_NS)
    assert (meta.taken, meta.source, meta.camera) == (wall(2019, 5, 4, 10, 11, 12), "exif", "Apple iPhone 12")


def test_pixels_are_never_decoded(monkeypatch):
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image.format))
    assert read_meta(photo(exif_ifd={ORIGINAL: "2019:05:04 10:11:12"}), MTIME_NS).source == "exif"
    assert read_meta(photo(fmt="PNG"), MTIME_NS).source == "mtime"  # Pillow's getexif would load a PNG to look on
    assert decoded == []


@pytest.mark.parametrize("make, model, camera", [
    ("Canon", "Canon EOS 5D", "Canon EOS 5D"),  # the make is not said twice
    ("SONY", "Sony ILCE-7M3", "Sony ILCE-7M3"),
    ("NIKON CORPORATION", "NIKON D750", "NIKON CORPORATION NIKON D750"),  # only a whole-make prefix is dropped
    ("Apple", "iPhone 12", "Apple iPhone 12"),
    ("FUJIFILM\0\0\0", "  X-T3 \0", "FUJIFILM X-T3"),  # NUL padding and blanks
    (None, "X100V", "X100V"),
    ("Ricoh", None, "Ricoh"),
    ("  ", "\0\0", None),
    (None, None, None),
])
def test_camera_is_make_and_model(make, model, camera):
    tags = {tag: value for tag, value in ((MAKE, make), (MODEL, model)) if value is not None}
    assert read_meta(photo(tags), MTIME_NS).camera == camera
