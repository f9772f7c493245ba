"""Decode one image file into the model's input size, or say in a few words why it cannot be read.

Steps match the checkpoint's image processor (transformers' BLIP PIL backend): transparent pixels over
white, RGB, resize to (height, width) with the processor's filter. We add what a photo folder needs
and the processor does not do: camera (EXIF) orientation, and a guard against decompression bombs.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from blipsearch.retrieval.errors import ImageLoadError
from blipsearch.retrieval.models.base import Preprocessing

# Pillow refuses images above 2 x MAX_IMAGE_PIXELS (~179 megapixels) as decompression bombs; so do we.
DEFAULT_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
_FILTERS = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}

_ORIENTATION = 0x0112  # EXIF tag
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey picture


@dataclass
class LoadedImage:
    pixels: np.ndarray  # (height, width, 3) uint8 at the model's input size
    width: int  # size of the oriented original
    height: int


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparent areas over white, as transformers' `convert_to_rgb` does."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def load_image(path: str | Path, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS,
               reduced_decode: bool = False, data: bytes | None = None) -> LoadedImage:
    """Decode, orient and resize one file (or its bytes, already read, as `data`); raises `ImageLoadError`.

    `reduced_decode` lets a JPEG decode at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's `draft`),
    never below the model's input size, before the same resize: a 12-megapixel photo decodes at 1/4
    scale, about 3x faster, and the resized pixels move by a quarter grey level on average
    (tests/test_images.py).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageLoadError(_bomb(width * height, max_pixels))
                if reduced_decode and image.format == "JPEG":
                    side = max(pre.width, pre.height)
                    image.draft("RGB", (side, side))
                if pre.exif_transpose:
                    if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):  # turned by 90 degrees
                        width, height = height, width
                    image = ImageOps.exif_transpose(image)
                rgb = to_rgb(image)
                resized = rgb.resize((pre.width, pre.height), resample=_FILTERS[pre.resample])
                return LoadedImage(np.asarray(resized, dtype=np.uint8), width, height)
    except ImageLoadError:
        raise
    except Exception as exc:  # Pillow signals bad data with many exception types
        raise ImageLoadError(failure_reason(path, exc)) from exc


def _bomb(pixels: int, limit: int) -> str:
    return f"decompression bomb: {pixels / 1e6:,.1f} megapixels is over the limit of {limit / 1e6:,.1f}"


def failure_reason(path: str | Path, exc: BaseException) -> str:
    """A few words on why reading or decoding `path` failed."""
    if isinstance(exc, Image.DecompressionBombError):  # Pillow's own check, at its global limit
        numbers = [int(n) for n in re.findall(r"\d+", str(exc))]
        return _bomb(*numbers[:2]) if len(numbers) >= 2 else "decompression bomb"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "file vanished or is a broken link"
    if isinstance(exc, UnidentifiedImageError):
        try:
            empty = Path(path).stat().st_size == 0
        except OSError:
            empty = False
        return "empty file (0 bytes)" if empty else "not an image, or a format Pillow cannot read"
    if "truncated" in str(exc):
        return "truncated image data"
    return f"cannot decode ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
