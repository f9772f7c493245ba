"""Where a model runs and in which precision."""

from __future__ import annotations

import functools
import os
import platform
import sys
from typing import TYPE_CHECKING

from .errors import InvalidInputError

if TYPE_CHECKING:  # torch loads when a device is chosen, so that `blipsearch --help` stays fast
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    import torch

    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def numpy_text_side(device: str, precision: str, one_shot: bool = False) -> bool:
    """True where a model loaded with these settings computes in fp32 on the CPU, known without importing
    torch: then a text query runs the numpy text side (models/blip_numpy.py) and never imports torch.

    auto devices: the CPU only on Linux without an NVIDIA, AMD (ROCm) or WSL2 GPU's device files (elsewhere, or
    with one, torch decides); auto precision: fp32 where /proc/cpuinfo's x86 flags list no bf16 units (as
    `cpu_has_fast_bf16`, which is asked instead once torch is imported anyway; without such flags, e.g. on
    ARM, torch decides). `one_shot`: the process answers a query or a few and exits (`blipsearch query`); then
    auto precision computes in fp32 on x86 CPUs with bf16 units too, as numpy's fp32 starts faster there than
    torch's bf16 computes. Measured on the 2-core AVX512-BF16 EPYC, a fresh full-size query of 32 candidates
    (medians of 7 runs, `benchmarks/bench_query.py`): 1.00 s (0.97-1.09) in fp32 numpy against 2.02 s
    (1.79-2.48) through torch in bf16, whose import and first-call kernel set-up outweigh its faster pass
    (warm: 359 against 872 ms). A process that stays (the server, the library) keeps bf16 there."""
    if device not in ("auto", "cpu") or precision not in ("auto", "fp32", "int8"):
        return False
    torch_loaded = "torch" in sys.modules
    if device == "auto":
        if torch_loaded:
            if select_device("auto").type != "cpu":
                return False
        elif platform.system() != "Linux" or any(map(os.path.exists, _ACCELERATOR_FILES)):
            return False
    if precision in ("fp32", "int8"):  # int8 is the image tower's: the text side stays fp32
        return True
    flags = _cpu_flags()
    if one_shot and flags is not None and "avx2" in flags:  # x86 with the vector units numpy's BLAS uses
        return True
    if torch_loaded:
        return not cpu_has_fast_bf16()
    return flags is not None and not flags & {"avx512_bf16", "amx_bf16"}


# NVIDIA, ROCm, and WSL2's GPU bridge (CUDA under WSL2 has no /dev/nvidia* files)
_ACCELERATOR_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/kfd", "/dev/dxg")


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux lists them; None where they cannot be read (not Linux, not x86)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def select_device(name: str = "auto") -> torch.device:
    """auto picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    import torch

    if name not in DEVICES:
        raise InvalidInputError(f"--device must be one of {', '.join(DEVICES)}, not {name!r}")
    has_mps = torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda: this torch build sees no CUDA device; use --device cpu")
    elif name == "mps" and not has_mps:
        raise InvalidInputError("--device mps: Apple's Metal backend is not available here; use --device cpu")
    return torch.device(name)


def select_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """auto: bf16 on CUDA cards that have it (else fp16), fp16 on mps, bf16 on CPUs with bf16 units, else fp32.
    int8 (the CPU only) is fp32 with the image tower's linear layers in int8 (models/int8.py)."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    import torch

    if precision == "int8":
        if device.type != "cpu":
            raise InvalidInputError(f"--precision int8 runs on the CPU only, not {device.type}; "
                                    "use --device cpu, or another precision")
        from .models.int8 import int8_engine

        if int8_engine() is None:
            raise InvalidInputError("--precision int8: this torch build has no quantized CPU kernels "
                                    "(fbgemm or oneDNN); use --precision fp32")
        return torch.float32
    if precision != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_KEEP_UP_TO = 2**31 - 1  # bytes: mallopt takes a C int


@functools.cache
def small_pages_for_a_short_run() -> bool:
    """Stop numpy from asking for transparent huge pages (`madvise(MADV_HUGEPAGE)` on every array of 4 MB or
    more) in a process that lives for one answer; True where that was set. With THP in `madvise` mode, the
    kernel may compact memory to find a 2 MB page at the first touch (the `defrag` default stalls for it):
    filling a fresh process's 57 MB array (a query's unpacked feature maps) took 8-9 ms in five of eight
    processes, 34, 100 and 216 ms in the others; in 4 KB pages 31-47 ms every time. A fresh full-size
    `blipsearch query` (the 2-core AVX2 EPYC, 20 alternating runs each): 1.13-1.24 s against 1.13-1.79 s (the
    default's five slowest: 1.79, 1.40, 1.36, 1.23, 1.21 s), medians 1.16 and 1.17 s. Long-lived processes
    keep the default: they reuse their memory. numpy's switch is private (`_set_madvise_hugepage`, numpy 1.20
    and later); without it nothing changes."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    switch = getattr(multiarray, "_set_madvise_hugepage", None)
    if switch is None:
        return False
    switch(False)
    return True


@functools.cache
def keep_freed_memory() -> bool:
    """Let this process keep the memory that large tensors free for the next ones (glibc's malloc), instead of
    handing it back to the OS and faulting it in again page by page; True where that was set.

    By default glibc maps every allocation over 32 MB on its own and unmaps it when freed, so each large
    activation of a model costs a page fault per 4 KB on every forward pass: a 4616 x 3072 fp32 tensor takes
    ~14,000 faults, and copying it ~30 ms instead of ~4 ms. Measured on `blipsearch index` of 48 photos with
    BLIP ViT-B (fp32, 2-core AVX2 EPYC): 50.4 -> 44.0 s (means of 3 and 5 runs), 2.8 million page faults ->
    0.48 million, peak memory 2.07 -> 2.15 GB. The cost: freed memory stays with the process until it exits,
    and glibc leaves several freed blocks of one size unused before it reuses one (aligned requests do not
    fit them exactly), so memory settles above the live tensors' peak. Process-wide, so the CLI (and a Ray
    encoder actor) calls it; a long-running program that embeds the library may call it once too. Elsewhere
    (other C libraries) nothing is changed."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # an older glibc may refuse a threshold over 32 MB: then no allocation is mapped on its own at all
    unmapped = bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_UP_TO)) or bool(mallopt(_M_MMAP_MAX, 0))
    kept = bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO))
    return unmapped and kept
