"""Where a model runs and in which precision."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import InvalidInputError

if TYPE_CHECKING:  # torch loads when a device is chosen, so that `blipsearch --help` stays fast
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    import torch

    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


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
    """auto: bf16 on CUDA cards that have it (else fp16), fp16 on mps, bf16 on CPUs with bf16 units, else fp32."""
    if precision not in PRECISIONS:
        raise InvalidInputError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    import torch

    if precision != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
