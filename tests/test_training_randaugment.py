"""BLIP's RandomAugment(2, 5), ported from OpenCV to PIL: each operation against its definition."""

import random

import numpy as np
import pytest
from PIL import Image, ImageOps

from blipsearch.training import randaugment
from blipsearch.training.data import augment


@pytest.fixture
def picture():
    rng = np.random.default_rng(0)
    pixels = np.full((40, 48, 3), 60, np.uint8)
    pixels[10:30, 8:20] = (200, 30, 30)  # a red block left of centre
    return pixels + rng.integers(0, 20, pixels.shape, dtype=np.uint8)


def run(name, pixels, sign):
    rng = random.Random(0)
    rng.random = lambda: 0.0 if sign < 0 else 0.9  # the sign draw
    return np.asarray(randaugment.apply(name, Image.fromarray(pixels), 5, rng))


def test_enhancements_are_identities_at_magnitude_5_and_tone_operations_match_pil(picture):
    for name in ("Identity", "Brightness", "Sharpness"):  # factor 5/10 * 1.8 + 0.1 = 1.0
        np.testing.assert_array_equal(run(name, picture, 1), picture)
    image = Image.fromarray(picture)
    np.testing.assert_array_equal(run("AutoContrast", picture, 1), np.asarray(ImageOps.autocontrast(image)))
    np.testing.assert_array_equal(run("Equalize", picture, 1), np.asarray(ImageOps.equalize(image)))


@pytest.mark.parametrize("sign", [1, -1])
def test_translations_move_by_5_pixels_and_fill_grey(picture, sign):
    moved = run("TranslateX", picture, sign)  # BLIP: warpAffine([[1, 0, -offset]]): content moves by -offset
    if sign > 0:
        np.testing.assert_array_equal(moved[:, :-5], picture[:, 5:])
        assert (moved[:, -5:] == 128).all()
    else:
        np.testing.assert_array_equal(moved[:, 5:], picture[:, :-5])
        assert (moved[:, :5] == 128).all()
    down = run("TranslateY", picture, sign)
    np.testing.assert_array_equal(down[:-5] if sign > 0 else down[5:], picture[5:] if sign > 0 else picture[:-5])


def test_shear_and_rotation_keep_the_size_and_the_centre(picture):
    for name in ("ShearX", "ShearY", "Rotate"):
        out = run(name, picture, 1)
        assert out.shape == picture.shape and not np.array_equal(out, picture)
        assert np.abs(out[20, 24].astype(int) - picture[20, 24].astype(int)).max() <= 20  # the centre stays put
    sheared = run("ShearX", picture, 1).astype(int)  # x' = x + 0.15 y: the top row stays (to a fraction of a
    assert np.abs(sheared[0, :] - picture[0, :]).max() <= 3  # pixel), the bottom one moves right by ~6 px
    np.testing.assert_allclose(sheared[-1, 8:40], picture[-1, 2:34], atol=25)
    assert np.abs(sheared[-1, 8:40] - picture[-1, 8:40]).mean() > np.abs(sheared[-1, 8:40] - picture[-1, 2:34]).mean()


def test_two_operations_with_replacement_each_at_probability_one_half():
    drawn = {name: 0 for name in randaugment.OPERATIONS}
    applied = 0
    rng = random.Random(1)
    calls = []
    real = randaugment.apply
    randaugment.apply = lambda name, image, magnitude, rng: calls.append(name) or image
    try:
        for _ in range(2000):
            randaugment.random_augment(np.zeros((8, 8, 3), np.uint8), rng)
    finally:
        randaugment.apply = real
    applied = len(calls)
    for name in calls:
        drawn[name] += 1
    assert 1800 < applied < 2200  # 4000 draws, half applied
    assert min(drawn.values()) > 120  # every operation is drawn (200 expected each)


def test_augment_is_seeded_and_never_mirrors_without_hflip(picture):
    one = augment(picture, random.Random("s-0-3"), randaugment=True)
    assert np.array_equal(one, augment(picture, random.Random("s-0-3"), randaugment=True))
    assert one.shape == picture.shape
    # the red block starts left of centre; no operation but the flip moves it to the right half
    for seed in range(50):
        out = augment(picture, random.Random(seed), randaugment=True).astype(int)
        red = (out[..., 0] > 150) & (out[..., 1] < 100)
        assert red[:, :24].sum() > red[:, 24:].sum()
