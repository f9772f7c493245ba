"""Decode one image file into the model's input size, or say in a few words why it cannot be read.

Steps match the checkpoint's image processor (transformers' BLIP PIL backend): transparent pixels over
white, RGB, resize to (height, width) with the processor's filter. We add what a photo folder needs
and the processor does not do: camera (EXIF) orientation, a guard against decompression bombs, and a
bound on memory: no step makes a second full-size copy of the decoded picture (see `load_image`).
"""

from __future__ import annotations

import functools
import io
import logging
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from blipsearch.retrieval.errors import ImageLoadError
from blipsearch.retrieval.models.base import Preprocessing

from .scan import open_regular

log = logging.getLogger(__name__)

# Pillow refuses images above 2 x MAX_IMAGE_PIXELS (~179 megapixels) as decompression bombs; so do we.
DEFAULT_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
# Reduced decoding box-reduces a large picture to at least this many times the model's input size before
# the exact resize, as Pillow's `reducing_gap` (3: "practically identical" to the plain resize).
REDUCING_GAP = 3
_BAND_PIXELS = 1 << 20  # pixels per band of rows converted to RGB at a time (~16 MB of temporaries)
_FILTERS = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}

_ORIENTATION = 0x0112  # EXIF tag; its values 2..8 as Pillow's `ImageOps.exif_transpose` applies them
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey picture


@dataclass
class LoadedImage:
    pixels: np.ndarray  # (height, width, 3) uint8 at the model's input size
    width: int  # size of the oriented original
    height: int


# 16-bit greyscale (PNG, TIFF scans), and 32-bit integer pictures, read as 16-bit values
_WIDE_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparent areas over white, as transformers' `convert_to_rgb` does; 16-bit greyscale is
    first scaled to 8 bits (Pillow's conversion, and so transformers', clips every value above 255: such a
    picture turned white), and float greyscale from 0..1 (it turned black)."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY:  # by the mode alone, so that a picture converted band by band is one picture
        grey = np.clip(np.asarray(image), 0, 65535) >> 8
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if image.mode == "F":  # 32-bit float greyscale (TIFF), as float pictures mostly are: 0 black, 1 white
        grey = np.rint(np.clip(np.nan_to_num(np.asarray(image)), 0.0, 1.0) * 255)
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def exif_turn(image: Image.Image) -> Image.Transpose | None:
    """The turn or flip that the picture's EXIF orientation asks for (None: none)."""
    return _TRANSPOSE.get(image.getexif().get(_ORIENTATION, 1))


def load_image(path: str | Path, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS,
               reduced_decode: bool = False, data: bytes | None = None) -> LoadedImage:
    """Decode, orient and resize one file (or its bytes, already read, as `data`); raises `ImageLoadError`.

    `reduced_decode` lets a JPEG decode at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's `draft`),
    never below the model's input size, and box-reduces other large pictures to `REDUCING_GAP` times it,
    before the same resize: a 12-megapixel photo decodes at 1/4 scale, about 3x faster, and the resized
    pixels move by a quarter grey level on average (tests/test_images.py).

    Memory: the decoded picture (at most 4 bytes a pixel in Pillow) plus, for pictures that are not RGB,
    a full-size RGB copy unless `reduced_decode`; conversion goes a band of rows at a time, and the
    orientation is applied to the resized result.
    """
    with _reasons(path), naming_warnings(path), _source(path, data) as source, _opened(source, max_pixels) as image:
        return _prepare(image, pre, reduced_decode)


def check_header(file: BinaryIO, path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse a file that is no image, or a picture over `max_pixels`, from its header (a few KB read)."""
    with _reasons(path), naming_warnings(path), _opened(file, max_pixels):
        pass


def _prepare(image: Image.Image, pre: Preprocessing, reduced_decode: bool) -> LoadedImage:
    width, height = image.size
    turn = exif_turn(image) if pre.exif_transpose else None
    # turned by 90 degrees: the model's width spans the file's height
    turned = turn in (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                      Image.Transpose.ROTATE_90)
    size = (pre.height, pre.width) if turned else (pre.width, pre.height)
    if reduced_decode and image.format == "JPEG":
        side = max(pre.width, pre.height)
        image.draft("RGB", (side, side))
    factors = _factors(image.size, size) if reduced_decode else (1, 1)
    box = (0, 0, image.width / factors[0], image.height / factors[1])  # the reduced picture's last pixels are part ones
    resized = _rgb(image, factors).resize(size, resample=_FILTERS[pre.resample], box=box)
    if turn is not None:
        resized = resized.transpose(turn)
    return LoadedImage(np.asarray(resized, dtype=np.uint8), *((height, width) if turned else (width, height)))


def _factors(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Box-reduction factors that leave at least REDUCING_GAP x `target` in each direction (as Pillow's)."""
    return (max(1, int(size[0] / target[0] / REDUCING_GAP)), max(1, int(size[1] / target[1] / REDUCING_GAP)))


def _rgb(image: Image.Image, factors: tuple[int, int]) -> Image.Image:
    """`to_rgb(image).reduce(factors)`, without a second full-size copy: other modes go a band of rows at a time."""
    if image.mode == "RGB":
        return image if factors == (1, 1) else image.reduce(factors)
    (fx, fy), (width, height) = factors, image.size
    out = Image.new("RGB", (-(-width // fx), -(-height // fy)))
    rows = fy * max(1, _BAND_PIXELS // (width * fy))  # whole boxes of the reduction in each band
    for top in range(0, height, rows):
        band = to_rgb(image.crop((0, top, width, min(top + rows, height))))
        out.paste(band.reduce(factors), (0, top // fy))
    return out


@contextmanager
def _reasons(path: str | Path) -> Iterator[None]:
    """Any failure inside becomes an `ImageLoadError` that says in a few words why."""
    try:
        yield
    except ImageLoadError:
        raise
    except Exception as exc:  # Pillow signals bad data with many exception types
        raise ImageLoadError(failure_reason(path, exc)) from exc


@contextmanager
def _source(path: str | Path, data: bytes | None) -> Iterator[BinaryIO]:
    if data is not None:
        yield io.BytesIO(data)  # shares the bytes, no copy
    else:
        with open_regular(path) as file:
            yield file


@contextmanager
def _opened(source: BinaryIO, max_pixels: int) -> Iterator[Image.Image]:
    """The picture, its header read and its pixel count checked; pixels are decoded on first use."""
    setup_pillow()
    try:
        opened = Image.open(source)
    except Image.DecompressionBombError as exc:  # Pillow's own check, at its global limit: name ours where lower
        numbers = [int(n) for n in re.findall(r"\d+", str(exc))]
        if len(numbers) < 2:
            raise
        raise ImageLoadError(_bomb(numbers[0], min(numbers[1], max_pixels))) from exc
    with opened as image:
        if image.width * image.height > max_pixels:
            raise ImageLoadError(_bomb(image.width * image.height, max_pixels))
        yield image


# ---- once per process: HEIC/HEIF, and Pillow's warnings naming their file --------------------------------

_decoding = threading.local()  # .path: the file this thread decodes
_setup_lock = threading.Lock()
_warned_lock = threading.Lock()


@contextmanager
def naming_warnings(path: str | Path) -> Iterator[None]:
    _decoding.path = str(path)
    try:
        yield
    finally:
        _decoding.path = None


def setup_pillow() -> None:
    with _setup_lock:  # decoding threads may arrive together; the hook must be installed once
        _setup_once()


@functools.cache
def _setup_once() -> None:
    """Register pillow-heif's opener where installed, and route Pillow's warnings through `_show_warning`.

    `warnings.catch_warnings` is process-wide, not per thread, so decoding threads cannot use it to learn
    which file a warning (corrupt EXIF, ...) is about; one hook reads the thread's file instead.
    """
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        pass
    else:
        register_heif_opener()
    passed_on = warnings.showwarning

    warned: dict[tuple[str, str], None] = {}  # the latest (file, message) pairs, in order

    def show(message, category, filename, lineno, file=None, line=None):
        path = getattr(_decoding, "path", None)
        if path is None:
            passed_on(message, category, filename, lineno, file, line)
            return
        key = (path, str(message))
        with _warned_lock:  # a file's header, metadata and pixels are read apart: its warning is said once
            if key in warned:
                return
            warned[key] = None
            if len(warned) > 256:
                del warned[next(iter(warned))]
        log.warning("%s: %s", path, message)

    warnings.showwarning = show
    warnings.filterwarnings("always", module=r"(PIL|pillow_heif)\b")  # every file's warning, not the first one
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # we refuse with our own reason


def _bomb(pixels: int, limit: int) -> str:
    size, most = f"{pixels / 1e6:,.1f}", f"{limit / 1e6:,.1f}"
    if size == most:  # just over: the counts themselves say which is more
        size, most = f"{pixels / 1e6:,.6f}", f"{limit / 1e6:,.6f}"
    return f"decompression bomb: {size} megapixels is over the limit of {most}"


def failure_reason(path: str | Path, exc: BaseException) -> str:
    """A few words on why reading or decoding `path` failed."""
    if isinstance(exc, Image.DecompressionBombError):  # Pillow's own check, at its global limit
        numbers = [int(n) for n in re.findall(r"\d+", str(exc))]
        return _bomb(*numbers[:2]) if len(numbers) >= 2 else "decompression bomb"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "no such file (vanished, or a broken link)"
    if isinstance(exc, UnidentifiedImageError):
        try:
            empty = Path(path).stat().st_size == 0
        except OSError:
            empty = False
        return "empty file (0 bytes)" if empty else "not an image, or a format Pillow cannot read"
    if "truncated" in str(exc).lower():  # Pillow: "image file is truncated", "Truncated File Read"
        return "truncated image data"
    return f"cannot decode ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
