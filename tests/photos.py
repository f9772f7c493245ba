"""Generated image folders for tests."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def make_photo(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    """A distinct random-noise picture (so every file has its own content hash and embedding)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def exif_photo(path: Path, seed: int, taken: str | None, make: str = "Canon", model: str = "Canon EOS 5D") -> Path:
    """A random-noise JPEG with EXIF DateTimeOriginal `taken` ("YYYY:MM:DD HH:MM:SS"; None: no date) and a camera."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = make, model
    if taken is not None:
        exif.get_ifd(0x8769)[0x9003] = taken
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path, "JPEG", exif=exif.tobytes())
    return path


def make_folder(folder: Path, count: int, seed: int = 0, ext: str = "png") -> list[Path]:
    return [make_photo(folder / f"img{i:03d}.{ext}", seed * 1000 + i) for i in range(count)]


def png_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header claims width x height pixels (10 gigapixels by default)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path
