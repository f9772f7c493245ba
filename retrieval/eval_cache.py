"""Image features for evaluation, computed once into memory-mapped files on disk and resumable.

Layout of one cache entry, `CACHE/<key>/` where key hashes the manifest:

    manifest.json     model id + revision, dtype, preprocessing, images root and the full image list
    features.npy      (I, T, H) float16 ITM token features (5K x 577 x 768 COCO: 4.4 GB)
    embeddings.npy    (I, V, D) float32 L2-normalised ITC vectors
    done.npy          (I, 2) int64, 0 until a row of both arrays is flushed, then the image file's size + 1
                      and its modification time (ns)

A batch's rows are flushed before their done marks are set, so a run killed at any point resumes with the
rows it finished; a row whose file changed since (its size or its modification time) is computed again.
The key covers the full image list, so `--limit N` runs fill and reuse the first N rows of the full run's
entry.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import ImageLoadError, InvalidInputError
from .models import RetrievalModel

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: done marks hold the modification time too (a same-size replacement was missed)
FEATURE_DTYPE = np.float16  # bf16 -> fp16 is exact for the normal range; fp32 rounds to 11 mantissa bits
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass
class FeatureCache:
    """Per-image ITC embeddings and ITM features, rows in annotation order."""

    directory: Path
    features: np.ndarray  # (I, T, H) float16 memmap
    embeddings: np.ndarray  # (I, V, D) float32 memmap
    done: np.ndarray  # (I, 2) int64 memmap: 0, or (file size + 1, mtime in ns) when the row was computed

    def missing(self, stamps: np.ndarray) -> np.ndarray:
        """Indices among the first len(stamps) rows not computed yet, or computed from a file since changed;
        `stamps` (N, 2): each file's size + 1 and modification time (`file_stamps`)."""
        return np.flatnonzero((self.done[:len(stamps)] != stamps).any(axis=1))

    def write(self, rows: np.ndarray, stamps: np.ndarray, embeddings: torch.Tensor,
              features: torch.Tensor) -> None:
        """Store a batch's rows; `stamps` are their files' (`file_stamps`), recorded once the data is on disk."""
        half = features.to(torch.float16)
        if torch.isinf(half).any() and torch.isfinite(features).all():
            raise InvalidInputError(f"image features exceed the float16 range (|x| > {_FP16_MAX:.0f}); this "
                                    "model's features cannot be cached as float16")
        self.features[rows] = half.cpu().numpy()
        self.embeddings[rows] = embeddings.float().cpu().numpy()
        _flush(self.features, self.embeddings)
        self.done[rows] = stamps
        _flush(self.done)


def file_stamps(root: Path, paths: list[str]) -> np.ndarray:
    """(N, 2) int64: each file's size + 1 (never 0, which marks a row not computed) and modification time."""
    stats = [(root / p).stat() for p in paths]
    return np.array([(st.st_size + 1, st.st_mtime_ns) for st in stats], dtype=np.int64).reshape(-1, 2)


def image_manifest(model: RetrievalModel, root: Path, paths: list[str]) -> dict:
    """What the cached features depend on; a change in any of it selects another cache entry."""
    info = model.info
    listing = hashlib.sha256(json.dumps(paths).encode()).hexdigest()
    return {
        "version": CACHE_VERSION,
        "model_id": info.model_id,
        "revision": info.revision,
        "dtype": str(getattr(model, "dtype", "unknown")) + (" int8" if getattr(model, "int8", False) else ""),
        "preprocessing": info.preprocessing.to_dict(),
        "feature_shape": [info.feature_tokens, info.feature_dim],
        "embedding_shape": [info.vectors_per_image, info.embed_dim],
        "images_root": str(root.resolve()),
        "images": len(paths),
        "images_sha256": listing,
    }


def open_cache(directory: Path, manifest: dict) -> FeatureCache:
    """Open the entry for `manifest` under `directory`, creating it (empty) when absent or damaged."""
    manifest = json.loads(json.dumps(manifest))  # tuples become lists, as they read back from disk
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    entry = directory / key
    count = manifest["images"]
    shapes = {"features.npy": ((count, *manifest["feature_shape"]), FEATURE_DTYPE),
              "embeddings.npy": ((count, *manifest["embedding_shape"]), np.float32),
              "done.npy": ((count, 2), np.int64)}
    try:
        entry.mkdir(parents=True, exist_ok=True)
        arrays = _open_arrays(entry, manifest, shapes)
    except OSError as exc:
        raise InvalidInputError(f"--cache {directory}: {exc.strerror or exc}") from exc
    cache = FeatureCache(entry, arrays["features.npy"], arrays["embeddings.npy"], arrays["done.npy"])
    log.info("feature cache %s: %d of %d images done", entry, int((cache.done[:, 0] > 0).sum()), count)
    return cache


def _open_arrays(entry: Path, manifest: dict, shapes: dict) -> dict[str, np.ndarray]:
    manifest_path = entry / "manifest.json"
    if _is_intact(entry, manifest, shapes):
        return {name: np.load(entry / name, mmap_mode="r+") for name in shapes}
    if manifest_path.exists():
        log.warning("feature cache %s is incomplete or from another version; starting it again", entry)
    manifest_path.unlink(missing_ok=True)  # invalid until every array exists
    arrays = {name: np.lib.format.open_memmap(entry / name, mode="w+", dtype=dtype, shape=shape)
              for name, (shape, dtype) in shapes.items()}
    for name in shapes:
        _reserve(entry / name)
    _flush(*arrays.values())
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, manifest_path)
    return arrays


def _reserve(path: Path) -> None:
    """Give the sparse file its blocks now: a disk that fills while the memory map writes into it kills the
    process (SIGBUS: "Bus error", exit 135) instead of raising an error."""
    with open(path, "r+b") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise InvalidInputError(f"the disk holding {path.parent} is full: the feature cache needs "
                                        f"{_total(path.parent) / 1e9:.1f} GB there; free space, or give --cache "
                                        "another folder") from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                raise


def _total(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.glob("*.npy"))


def _is_intact(entry: Path, manifest: dict, shapes: dict) -> bool:
    try:
        if json.loads((entry / "manifest.json").read_text()) != manifest:
            return False
        for name, (shape, dtype) in shapes.items():
            array = np.load(entry / name, mmap_mode="r")
            if array.shape != shape or array.dtype != dtype:
                return False
        return True
    except (OSError, ValueError, EOFError):  # EOFError: an empty file
        return False


def _flush(*arrays: np.ndarray) -> None:
    for array in arrays:
        if isinstance(array, np.memmap):
            array.flush()


def fill_cache(model: RetrievalModel, cache: FeatureCache, root: Path, paths: list[str], batch_size: int,
               workers: int, progress: bool = True) -> int:
    """Encode the images among `paths` (the first rows of the cache) not cached yet; returns how many."""
    stamps = file_stamps(root, paths)
    rows = cache.missing(stamps)
    if not len(rows):
        return 0
    with tqdm(total=len(rows), desc="image encoding", unit="img", disable=not progress) as bar:
        for batch_rows, pixels in decoded_batches(root, paths, rows, model.info.preprocessing, batch_size,
                                                  workers):
            encoding = model.encode_images(model.pixel_values(pixels))
            cache.write(batch_rows, stamps[batch_rows], encoding.embeddings, encoding.features)
            bar.update(len(batch_rows))
    return len(rows)


def decoded_batches(root: Path, paths: list[str], rows: np.ndarray, preprocessing, batch_size: int,
                    workers: int) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """(rows, uint8 pixel arrays) per batch, in order; decoding runs `workers` threads, one batch ahead."""
    from blipsearch.indexer.images import load_image
    from blipsearch.indexer.readahead import bounded_map

    def decode(row: int) -> np.ndarray:
        try:
            return load_image(root / paths[row], preprocessing).pixels
        except ImageLoadError as exc:
            raise ImageLoadError(f"image {root / paths[row]}: {exc}; recall counts every annotated image: "
                                 "replace the file, or remove its entry from the annotation file") from exc

    decoded = bounded_map(decode, rows, max(1, workers), ahead=batch_size)
    with closing(decoded):
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            yield batch, [next(decoded) for _ in batch]
