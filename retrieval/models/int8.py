"""`--precision int8`: the image tower's linear layers in int8 on the CPU, checked against fp32 on the first batch.

What runs in int8: the four linear layers of every ViT block (qkv, output projection, fc1, fc2), ~88% of a
ViT-B/16's FLOPs at 384 px. Weights are int8 with one scale per output channel. Activations are quantized
on each call (dynamic), one scale per image, to 7 bits: CPUs without VNNI multiply int8 pairs into 16-bit
sums (`vpmaddubsw`), and 8-bit activations saturate those (on Gaussian inputs fc2's error was 0.060 of the
output's range with 8 bits, 0.026 with 7, on the 2-core AVX2 EPYC). torch's quantized kernels do the products
(oneDNN's where torch has them, else fbgemm's), accumulating in int32 and writing fp32. The patch embedding,
attention, layer norms, GELU, the heads and the whole text side stay fp32.

On that CPU the four layers ran 1.4-2.0x faster than fp32 single-threaded (ViT-B's shapes, 2,308 rows), and
the ViT-B encoder ~1.5x (16 images, medians of 4 alternating rounds: 11.37 -> 7.68 s, then with chunks of
one image 12.07 -> 7.73 s in a noisier run); `blipsearch index` 1.3-1.6x by images/s, 1.36-1.38x by fraction
of the same-run peak (bench_index.py --int8).

Dynamic int8 is exact enough only where activations have no channels far larger than the rest: an input with
4 such channels at 40x the others' scale had errors of 0.29 of the output's range, and ViTs are known to grow
such channels. The demo models have none (ITC embeddings within cosine 0.9996 of fp32), and no full-size BLIP
weights can be checked where this was built. So an int8 model checks itself: the first `CHECK_IMAGES` images
of its first batch are encoded in fp32 too. If an ITC embedding falls below `MIN_COSINE` of its fp32 twin, or
the token features' median error exceeds `MAX_FEATURE_ERROR`, it logs why and encodes in fp32 from then on.
`Int8Check` keeps the verdict.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError
from .layers import Linear

log = logging.getLogger(__name__)

# The first batch's bar, about 2-3x the demo model's measured distance from fp32 (cosine 0.99965 at worst,
# token features' median error 0.014 on the 60 demo photos), at which its scene test recall moved by at most
# 1.2 points (README, Models).
MIN_COSINE = 0.999
MAX_FEATURE_ERROR = 0.03
CHECK_IMAGES = 4  # of the first batch, encoded in fp32 too: a quarter of a CPU batch's time, once per model
_ENGINES = ("onednn", "fbgemm", "x86")  # oneDNN's int8 GEMM was the fastest on the AVX2 EPYC, fbgemm close

Output = TypeVar("Output")


def int8_engine() -> str | None:
    """torch's quantized CPU engine that packs the int8 weights; None where this build has none. torch 2.13
    marks its quantized tensor types (which the packing takes) deprecated; a torch without them gets None,
    and `--precision int8` then says so."""
    ops = getattr(torch.ops, "quantized", None)
    if (ops is None or not hasattr(torch, "quantize_per_channel")
            or not all(hasattr(ops, op) for op in ("linear_prepack", "linear_dynamic"))):
        return None
    supported = torch.backends.quantized.supported_engines
    return next((engine for engine in _ENGINES if engine in supported), None)


class Int8Linear(nn.Module):
    """A `Linear`'s int8 twin: weights int8 per output channel, activations 7-bit per call (module docstring)."""

    def __init__(self, linear: Linear, engine: str):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1).clamp_min(1e-12) / 127).double()
        zero = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch 2.13 marks its quantized tensor types deprecated (`int8_engine`)
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch.quantize_per_channel(weight, scales, zero, 0, torch.qint8)
        self.out_features = weight.shape[0]
        with _engine(engine):  # the packed weights keep the engine's kernels whatever the setting later
            self.packed = torch.ops.quantized.linear_prepack(quantized, linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) fp32; with 3 or more dims each item of the first is quantized on its own (an image's
        tokens), so that an image's features do not depend on the batch it came in."""
        if x.dim() <= 2:
            return self._rows(x)
        if x.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        if x.shape[0] == 1:  # one image (the int8 tower runs in chunks of one): no copy into a stacked output
            return self._rows(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        items = [self._rows(item.reshape(-1, x.shape[-1])) for item in x.float()]
        return torch.stack(items).reshape(*x.shape[:-1], self.out_features)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(rows.float(), self.packed, True)  # True: 7-bit activations

    def _apply(self, fn, recurse: bool = True):
        """`.to()`, `.float()`, `.cuda()`...: the packed weights would not follow (they are no tensors of
        the module's), so these are refused; make a new twin of the moved tower instead."""
        raise RuntimeError("int8 layers cannot be moved or cast; make the int8 twin again from the fp32 tower")


_ENGINE_LOCK = threading.Lock()


@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    """torch's quantized engine set to `name` for the block (process-wide, so one block at a time)."""
    with _ENGINE_LOCK:
        previous = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = name
            yield
        finally:
            torch.backends.quantized.engine = previous


def int8_twin(tower: nn.Module) -> nn.Module:
    """A copy of `tower` whose ViT block linear layers (every `Linear` under `encoder.layers`) run in int8;
    the other modules' fp32 tensors are shared with `tower`, which is left as it was. The int8 weights are
    packed from `tower`'s as they are now: a tower moved, cast or reloaded afterwards needs a new twin (the
    twin's int8 layers refuse `.to()` and the like). ~1 s for ViT-B's 48 layers on the 2-core AVX2 EPYC."""
    engine = int8_engine()
    if engine is None:
        raise ModelLoadError("--precision int8: this torch build has no quantized CPU kernels (fbgemm or oneDNN); "
                             "use --precision fp32")

    def twin(module: nn.Module, path: str) -> nn.Module:
        if isinstance(module, Linear) and ".encoder.layers." in f".{path}":
            return Int8Linear(module, engine)
        copied = copy.copy(module)  # the same tensors; its own tables of them and of children, filled below
        copied._parameters, copied._buffers = dict(module._parameters), dict(module._buffers)
        copied._modules = {name: None if child is None else twin(child, f"{path}.{name}" if path else name)
                           for name, child in module._modules.items()}
        return copied

    try:
        return twin(tower, "")
    except RuntimeError as exc:  # a kernel that refuses this CPU or these weights
        raise ModelLoadError(f"--precision int8: torch could not pack the image tower's weights ({exc}); "
                             "use --precision fp32") from exc


@dataclass(frozen=True)
class Int8Check:
    """The first batch against fp32: the lowest ITC embedding cosine, the token features' median relative
    error, the images compared, and whether the int8 path is kept."""

    min_cosine: float
    feature_error: float
    images: int

    @property
    def passed(self) -> bool:
        return self.min_cosine >= MIN_COSINE and self.feature_error <= MAX_FEATURE_ERROR

    def describe(self) -> str:
        images = "1 image" if self.images == 1 else f"{self.images} images"
        measured = (f"int8 check on {images} of the first batch: ITC embeddings within cosine "
                    f"{self.min_cosine:.5f} of fp32 (bar {MIN_COSINE}), token features' median error "
                    f"{self.feature_error:.4f} (bar {MAX_FEATURE_ERROR})")
        return measured + ("; encoding in int8" if self.passed else
                           "; too far from fp32 for this model: encoding in fp32 instead (--precision fp32 "
                           "skips the check)")


def compare(int8: tuple[torch.Tensor, torch.Tensor], fp32: tuple[torch.Tensor, torch.Tensor]) -> Int8Check:
    """(features (B, T, H), embeddings (B, ..., D)) of one batch, int8 against fp32."""
    (features, embeddings), (ref_features, ref_embeddings) = int8, fp32
    dim = embeddings.shape[-1]
    cosine = F.cosine_similarity(embeddings.reshape(-1, dim).float(), ref_embeddings.reshape(-1, dim).float(), dim=-1)
    error = (features.float() - ref_features.float()).norm(dim=-1) / ref_features.float().norm(dim=-1).clamp_min(1e-12)
    return Int8Check(float(cosine.min()), float(error.median()), int(features.shape[0]))


class Int8Images:
    """Encodes image batches with the int8 twin of a tower; the first batch's first `CHECK_IMAGES` images are
    compared with the tower in fp32 (`compare`), and after a failed check every batch, that one included, is
    encoded in fp32. The twin is made at the first batch: a run that encodes nothing (an unchanged folder, a
    Ray driver, a server asked no image query) does not pack the weights.

    The check costs the fp32 encoding of up to 4 images once per model load, so int8 pays over batches of
    many images (indexing); a single image query in a fresh process costs more than in fp32."""

    def __init__(self, fp32: nn.Module):
        self.fp32 = fp32
        self.int8: nn.Module | None = None
        self.check: Int8Check | None = None
        self._lock = threading.Lock()

    def run(self, encode: Callable[[nn.Module, torch.Tensor], Output], pixels: torch.Tensor,
            chunked: Callable[[Callable[[torch.Tensor], Output], torch.Tensor, bool], Output]) -> Output:
        """`encode(tower, pixels)` -> (features, embeddings), through `chunked(compute, pixels, one_image)`:
        the int8 tower in chunks of one image (each linear layer then quantizes its whole input with one
        scale, and no per-image outputs are stacked: 8.0 -> 7.0 s for 16 ViT-B images, bit-identical)."""
        if self.check is None:
            with self._lock:
                if self.check is None:
                    if self.int8 is None:
                        self.int8 = int8_twin(self.fp32)
                    fast = chunked(functools.partial(encode, self.int8), pixels, True)
                    sample = pixels[:CHECK_IMAGES]
                    exact = chunked(functools.partial(encode, self.fp32), sample, False)
                    self.check = compare(tuple(part[:len(sample)] for part in fast), exact)
                    (log.info if self.check.passed else log.warning)(self.check.describe())
                    if self.check.passed:
                        return fast
        if self.check.passed:
            return chunked(functools.partial(encode, self.int8), pixels, True)
        return chunked(functools.partial(encode, self.fp32), pixels, False)
