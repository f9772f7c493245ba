"""BLIP's RandomAugment(2, 5) (salesforce/BLIP `transform/randaugment.py`), on PIL instead of OpenCV.

BLIP's training transform (pre-training and fine-tuning alike) is random resized crop, horizontal flip,
then this: two operations drawn with replacement from the list below, each applied with probability 0.5,
at magnitude 5 of 10:

    Identity, AutoContrast, Equalize      no argument
    Brightness, Sharpness                 factor 5/10 * 1.8 + 0.1 = 1.0: no change at this magnitude
    ShearX, ShearY                        +-0.15 (sign drawn)
    TranslateX, TranslateY                +-5 pixels (sign drawn)
    Rotate                                +-15 degrees (sign drawn)

Geometric operations fill with grey (128, 128, 128), as BLIP's. None of them mirrors the picture, so
captions that say "left of" stay true (unlike the horizontal flip, which is off by default here).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10
FILL = (128, 128, 128)
OPERATIONS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX", "ShearY",
              "TranslateX", "TranslateY", "Rotate")  # BLIP's list for image-text training


def random_augment(pixels: np.ndarray, rng: random.Random, count: int = 2, magnitude: int = 5) -> np.ndarray:
    """(H, W, 3) uint8 -> the same shape, after `count` operations drawn from OPERATIONS."""
    image = Image.fromarray(np.ascontiguousarray(pixels))
    for name in [rng.choice(OPERATIONS) for _ in range(count)]:
        if rng.random() < 0.5:  # BLIP: `if np.random.random() > prob: continue` with prob 0.5
            image = apply(name, image, magnitude, rng)
    return np.asarray(image)


def apply(name: str, image: Image.Image, magnitude: int, rng: random.Random) -> Image.Image:
    level = magnitude / MAX_LEVEL
    sign = -1.0 if rng.random() < 0.5 else 1.0  # drawn for every operation; only the geometric ones use it
    return _OPS[name](image, level, sign)


def _enhance(kind) -> Callable[[Image.Image, float, float], Image.Image]:
    return lambda image, level, sign: kind(image).enhance(level * 1.8 + 0.1)


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    """PIL's inverse mapping (output pixel -> input pixel), as OpenCV's warpAffine with BLIP's matrices."""
    return image.transform(image.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR, fillcolor=FILL)


_OPS: dict[str, Callable[[Image.Image, float, float], Image.Image]] = {
    "Identity": lambda image, level, sign: image,
    "AutoContrast": lambda image, level, sign: ImageOps.autocontrast(image),
    "Equalize": lambda image, level, sign: ImageOps.equalize(image),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda image, level, sign: _affine(image, (1, -sign * 0.3 * level, 0, 0, 1, 0)),
    "ShearY": lambda image, level, sign: _affine(image, (1, 0, 0, -sign * 0.3 * level, 1, 0)),
    "TranslateX": lambda image, level, sign: _affine(image, (1, 0, sign * 10 * level, 0, 1, 0)),
    "TranslateY": lambda image, level, sign: _affine(image, (1, 0, 0, 0, 1, sign * 10 * level)),
    "Rotate": lambda image, level, sign: image.rotate(sign * 30 * level, Image.Resampling.BILINEAR, fillcolor=FILL),
}
