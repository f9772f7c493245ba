"""Decoding: orientation, formats, and bad files with their reasons."""

import io
import re

import numpy as np
import pytest
from PIL import Image

from blipsearch.indexer.images import load_image, to_rgb
from blipsearch.indexer.scan import content_hash, scan
from blipsearch.retrieval.errors import ImageLoadError
from blipsearch.retrieval.models.base import Preprocessing

from photos import make_photo, png_bomb

PRE = Preprocessing(height=16, width=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_exif_orientation_is_applied(tmp_path):
    # left half black, right half white; EXIF 6 means "rotate 90° clockwise to view"
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, 32:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(tmp_path / "r.jpg", PRE)
    assert (loaded.width, loaded.height) == (32, 64)  # portrait after orientation
    top, bottom = loaded.pixels[:4].mean(), loaded.pixels[-4:].mean()
    assert top < 40 and bottom > 215  # black side on top once rotated clockwise


@pytest.mark.parametrize("ext", ["JPG", "jpeg", "png", "webp", "bmp", "gif", "tif", "TIFF"])
def test_formats_decode_in_any_letter_case(tmp_path, ext):
    path = make_photo(tmp_path / f"a.{ext}", seed=3)
    assert load_image(path, PRE).pixels.shape == (16, 16, 3)
    assert [f.path for f in scan([tmp_path]).files] == [str(path)]


def test_transparency_goes_over_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert (load_image(tmp_path / "t.png", PRE).pixels == 255).all()


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped_to_white(tmp_path, suffix):
    values = (np.arange(64, dtype=np.uint32)[None, :] * 1024 + 300).repeat(8, axis=0).astype(np.uint16)  # 300..64812
    Image.fromarray(values).save(tmp_path / f"g.{suffix}")
    assert Image.open(tmp_path / f"g.{suffix}").mode == "I;16"
    pre = Preprocessing(height=8, width=64, mean=(0.5,) * 3, std=(0.5,) * 3, resample="nearest")
    pixels = load_image(tmp_path / f"g.{suffix}", pre).pixels
    np.testing.assert_array_equal(pixels, np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=-1))
    wide = Image.fromarray(values.astype(np.int32))  # mode "I": read as 16-bit values too
    np.testing.assert_array_equal(np.asarray(to_rgb(wide))[..., 0], values >> 8)


def test_float_greyscale_reads_0_as_black_and_1_as_white(tmp_path):
    values = np.linspace(0, 1, 64, dtype=np.float32)[None, :].repeat(4, axis=0)  # an all-black picture before
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    pre = Preprocessing(height=4, width=64, mean=(0.5,) * 3, std=(0.5,) * 3, resample="nearest")
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif", pre).pixels[..., 1], np.rint(values * 255))


def truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def dangling_link(path):
    path.symlink_to(path.with_name("missing.jpg"))
    return path


BAD_FILES = [  # (maker, reason): one of each kind of bad file a photo folder holds
    (lambda d: truncated_jpeg(d / "cut.jpg"), "truncated image data"),
    (lambda d: write(d / "zero.png", b""), "empty file (0 bytes)"),
    (lambda d: write(d / "text.jpg", b"hello"), "not an image, or a format Pillow cannot read"),
    (lambda d: png_bomb(d / "bomb.png"), "decompression bomb: 10,000.0 megapixels is over the limit of 179.0"),
    (lambda d: dangling_link(d / "gone.jpg"), "no such file (vanished, or a broken link)"),
]


@pytest.mark.parametrize("make, reason", BAD_FILES)
def test_bad_files_raise_a_short_reason(tmp_path, make, reason):
    with pytest.raises(ImageLoadError, match=re.escape(reason)):
        load_image(make(tmp_path), PRE)


def test_bomb_limit_is_configurable(tmp_path):
    Image.new("RGB", (3000, 2000)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match=re.escape("decompression bomb: 6.0 megapixels is over the limit of 5.0")):
        load_image(tmp_path / "big.png", PRE, max_pixels=5_000_000)
    assert load_image(tmp_path / "big.png", PRE, max_pixels=6_000_000).width == 3000
    with pytest.raises(ImageLoadError, match=re.escape("6.000000 megapixels is over the limit of 5.999999")):
        load_image(tmp_path / "big.png", PRE, max_pixels=5_999_999)  # just over: not "6.0 is over 6.0"
    # past Pillow's own limit (~179 megapixels) its check comes first: the message names ours, where lower
    with pytest.raises(ImageLoadError, match=re.escape("10,000.0 megapixels is over the limit of 50.0") + "$"):
        load_image(png_bomb(tmp_path / "bomb.png"), PRE, max_pixels=50_000_000)


def test_scan_skips_hidden_and_other_files_and_hash_follows_content(tmp_path):
    a = make_photo(tmp_path / "x" / "a.png", seed=1)
    make_photo(tmp_path / ".hidden" / "b.png", seed=2)
    make_photo(tmp_path / ".c.png", seed=3)
    (tmp_path / "notes.txt").write_text("no")
    assert [f.path for f in scan([tmp_path]).files] == [str(a)]
    copy = tmp_path / "copy.png"
    copy.write_bytes(a.read_bytes())
    assert content_hash(copy) == content_hash(a) != content_hash(make_photo(tmp_path / "d.png", seed=4))


def photo_like(path, size=(2400, 1800)):
    """Smooth shading, edges and grain, saved as a quality-90 JPEG: what a camera writes."""
    from PIL import ImageDraw

    rng = np.random.default_rng(5)
    base = Image.fromarray(rng.integers(0, 255, (6, 8, 3), np.uint8)).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(12):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        draw.ellipse([x, y, x + rng.integers(50, 600), y + rng.integers(50, 600)],
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    grain = rng.normal(0, 6, (size[1], size[0], 3))
    Image.fromarray(np.clip(np.asarray(base) + grain, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def test_reduced_jpeg_decode_moves_pixels_by_under_a_grey_level_on_average(tmp_path):
    pre = Preprocessing(height=384, width=384, mean=(0.5,) * 3, std=(0.5,) * 3)
    path = photo_like(tmp_path / "photo.jpg")
    exact = load_image(path, pre).pixels.astype(np.float32)
    reduced = load_image(path, pre, reduced_decode=True)
    assert (reduced.width, reduced.height) == (2400, 1800)  # the original size, not the decoded one
    difference = np.abs(reduced.pixels.astype(np.float32) - exact)
    assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 4
    assert difference.max() > 0  # it did decode differently: the bound is the claim


def test_reduced_decode_leaves_other_formats_and_orientation_alone(tmp_path):
    path = make_photo(tmp_path / "a.png", seed=2)
    np.testing.assert_array_equal(load_image(path, PRE, reduced_decode=True).pixels, load_image(path, PRE).pixels)
    pixels = np.zeros((600, 1200, 3), np.uint8)
    pixels[:, 600:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(tmp_path / "r.jpg", PRE, reduced_decode=True)
    assert (loaded.width, loaded.height) == (600, 1200)
    assert loaded.pixels[:4].mean() < 40 and loaded.pixels[-4:].mean() > 215


def test_heic_photos_are_indexed_when_pillow_heif_is_installed(tmp_path):
    """pillow-heif is the `heic` extra (and part of `dev`, so CI runs this); fresh processes: test_faults_reads.py."""
    import pillow_heif

    from blipsearch.indexer.scan import supported_extensions

    assert ".heic" in supported_extensions()
    path = tmp_path / "phone.HEIC"
    pixels = np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8)
    pillow_heif.from_pillow(Image.fromarray(pixels)).save(path, quality=90)
    assert [f.path for f in scan([tmp_path]).files] == [str(path)]
    loaded = load_image(path, PRE)
    assert (loaded.width, loaded.height) == (48, 40) and loaded.pixels.shape == (16, 16, 3)


def transparent_and_palette(tmp_path, size=(150, 110)):
    """An RGBA picture with graded transparency and a palette one with a transparent entry."""
    rng = np.random.default_rng(8)
    rgba = rng.integers(0, 255, (size[1], size[0], 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    palette = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).quantize(64)
    palette.save(tmp_path / "p.png", transparency=3)
    Image.fromarray(rgba[..., 0]).save(tmp_path / "l.png")
    return [tmp_path / "a.png", tmp_path / "p.png", tmp_path / "l.png"]


def test_band_by_band_conversion_equals_transformers_convert_to_rgb_and_resize(tmp_path, monkeypatch):
    from transformers.image_transforms import convert_to_rgb

    from blipsearch.indexer import images

    monkeypatch.setattr(images, "_BAND_PIXELS", 1000)  # many bands of 6 rows
    for path in transparent_and_palette(tmp_path):
        expected = convert_to_rgb(Image.open(path)).resize((16, 16), Image.Resampling.BICUBIC)
        np.testing.assert_array_equal(load_image(path, PRE).pixels, np.asarray(expected), err_msg=path.name)


def test_band_by_band_reduction_equals_the_whole_picture_reduced(tmp_path, monkeypatch):
    from blipsearch.indexer import images

    monkeypatch.setattr(images, "_BAND_PIXELS", 1000)
    for path in transparent_and_palette(tmp_path):
        with Image.open(path) as image:
            ours = images._rgb(image, (3, 2))
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(images.to_rgb(image).reduce((3, 2))))


def test_reduced_decode_of_a_large_png_moves_pixels_by_under_a_grey_level_on_average(tmp_path):
    pre = Preprocessing(height=384, width=384, mean=(0.5,) * 3, std=(0.5,) * 3)
    path = tmp_path / "photo.png"
    Image.open(photo_like(tmp_path / "photo.jpg", size=(4000, 3000))).save(path)
    exact = load_image(path, pre).pixels.astype(np.float32)
    reduced = load_image(path, pre, reduced_decode=True)
    assert (reduced.width, reduced.height) == (4000, 3000)
    difference = np.abs(reduced.pixels.astype(np.float32) - exact)
    assert difference.mean() < 0.5 and np.percentile(difference, 99) <= 2
    assert difference.max() > 0  # it was box-reduced first: the bound is the claim


@pytest.mark.parametrize("orientation", range(2, 9))
def test_orientation_applied_after_the_resize_is_within_a_grey_level_of_before(tmp_path, orientation):
    """The picture is resized, then turned (no full-size turned copy); turned first, it differs by rounding."""
    from PIL import ImageOps

    pre = Preprocessing(height=64, width=48, mean=(0.5,) * 3, std=(0.5,) * 3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.open(photo_like(tmp_path / "p.jpg", size=(400, 300))).save(tmp_path / "r.png", exif=exif.tobytes())
    turned = ImageOps.exif_transpose(Image.open(tmp_path / "r.png"))
    expected = np.asarray(turned.resize((48, 64), Image.Resampling.BICUBIC), dtype=np.float32)
    loaded = load_image(tmp_path / "r.png", pre)
    assert (loaded.width, loaded.height) == turned.size
    difference = np.abs(loaded.pixels - expected)
    assert difference.mean() < 0.5 and difference.max() <= 2
