"""Inference-only layers whose parameters start uninitialised: every value comes from a checkpoint.

torch's own layers draw random initial weights (seconds for a BLIP model, and on the meta device the
initialisers import torch._dynamo, ~0.8 s), all of it thrown away when the checkpoint loads. Parameter
names and shapes match torch's layers, so checkpoints load as they are.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import native


def _parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = _parameter(out_features, in_features)
        self.bias = _parameter(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def linear_gelu(x: torch.Tensor, linear: Linear) -> torch.Tensor:
    """gelu(linear(x)) (exact, erf) in one oneDNN call for bf16 on CPU: the activation is applied to the float
    accumulator before the output is rounded and never makes a separate pass over memory (a ViT-B layer's
    3072-wide activation at batch 16: 162 -> 133 ms on a 2-core AVX512-BF16 CPU). Elsewhere (other dtypes,
    autocast, autograd, CPUs without bf16 units or torch without the op; `linear` another module, e.g. int8's)
    the two plain calls."""
    if not isinstance(linear, Linear):
        return F.gelu(linear(x))
    if (x.device.type == "cpu" and x.dtype == torch.bfloat16 == linear.weight.dtype and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and _fused_linear_available()):
        return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "gelu", [], "none")
    return F.gelu(F.linear(x, linear.weight, linear.bias))


@functools.cache
def _fused_linear_available() -> bool:
    """The oneDNN op exists and this CPU has bf16 units (where it was measured); autocast and autograd do
    not know the op, so those callers keep the plain calls."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_is_mkldnn_bf16_supported") and bool(mkldnn._is_mkldnn_bf16_supported()))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, T, d), every position valid (a ViT's self-attention).

    bf16 on CPUs with AVX512-BF16 and no AMX: first `native.attention`, which multiplies bf16 pairs in hardware
    with fp32 scores and softmax (its error that of torch's bf16 flash kernel; about twice as fast as what
    follows, see native.py), where the machine can build it and the heads are 64 wide. Else oneDNN Graph's
    fused attention: TorchScript hands the matmul-scale-softmax-matmul pattern to oneDNN, which keeps each
    block of scores in cache. It computes in fp32 inside (inputs widened, output rounded to bf16 once), so it
    is as exact as torch's bf16 flash kernel or more (max error against float64 on random inputs: 0.0019
    against the flash kernel's 0.0050; on peaked attention 0.0078 against 0.0095) and still faster:
    577 tokens of 64-wide heads, batch 16, 101 ms against 126-150 ms for `F.scaled_dot_product_attention` on a
    2-core AVX512-BF16 CPU (bf16 scores inside would take ~60 ms, with 3-5x the flash kernel's error).
    CPUs with AMX keep the flash kernel: it runs its bf16 matmuls on AMX tiles, which fp32 inside cannot
    use, and the fused path has not been measured there. Elsewhere, or where torch cannot build it, the
    flash kernel too."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and not torch.is_grad_enabled() and not _has_amx():
        computed = native.attention(q, k, v)  # bf16 products with fp32 scores, where it could be built
        if computed is not None:
            return computed
        fused = _fused_attention_for(q, k, v)
        if fused is not None:
            return fused(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


_LAYOUTS: dict[tuple, torch.jit.ScriptModule | None] = {}  # input layout -> the module profiled for it (None: SDPA)
_LAYOUTS_LOCK = threading.Lock()
# TorchScript specialises a traced graph for a bounded number of input layouts (its fusion strategy: 2 static
# + 10 dynamic); past that it runs the graph unfused, so a module serves at most this many layouts
_LAYOUTS_PER_MODULE = 8


def _fused_attention_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The fused module for these inputs' layout, profiled for it; None where torch cannot build one.

    TorchScript runs the first call of each layout unfused while it profiles it, and that result differs
    from the fused kernel's in the last bf16 bit: an image's features would then depend on the batch it came
    in. So that call is made here and dropped, and every layout gets a module that still fuses it."""
    layout = tuple((tuple(t.shape), t.stride()) for t in (q, k, v))
    if layout in _LAYOUTS:
        return _LAYOUTS[layout]
    with _LAYOUTS_LOCK:  # one profiling run per layout, and no two layouts profiled on one module at once
        if layout not in _LAYOUTS:
            module = _onednn_graph_attention(q.shape[-1], _generation(q.shape[-1]))
            try:
                if module is not None:
                    module(q, k, v)  # the unfused profiling run (it holds fp32 scores: B x heads x T x T)
            except Exception as exc:  # oneDNN refused this layout: the flash kernel serves it
                logging.getLogger(__name__).debug("fused attention failed for %s (%s); using SDPA", layout, exc)
                module = None
            _LAYOUTS[layout] = module
    return _LAYOUTS[layout]


def _generation(head_size: int) -> int:
    """Which module of this head size takes a new layout: each serves `_LAYOUTS_PER_MODULE` at most."""
    served = sum(1 for layout, module in _LAYOUTS.items() if module is not None and layout[0][0][-1] == head_size)
    return served // _LAYOUTS_PER_MODULE


@functools.cache
def _has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x; absent means unknown
    return bool(probe()) if probe is not None else False


class _ScaledAttention(nn.Module):
    def __init__(self, head_size: int):
        super().__init__()
        self.scale = 1.0 / math.sqrt(head_size)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.scale
        return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


@functools.cache
def _onednn_graph_attention(head_size: int, generation: int = 0):
    """A traced, frozen `_ScaledAttention` with oneDNN Graph fusion on (one per `generation`: see
    `_LAYOUTS_PER_MODULE`); None where torch lacks it."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.jit, "enable_onednn_fusion")):
        return None
    try:
        torch.jit.enable_onednn_fusion(True)  # process-wide; only this module's TorchScript runs here
        example = torch.zeros(1, 1, 8, head_size, dtype=torch.bfloat16)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated; SDPA stays the fallback
            return torch.jit.freeze(torch.jit.trace(_ScaledAttention(head_size).eval(), (example,) * 3))
    except Exception as exc:  # any failure to build it only costs speed
        logging.getLogger(__name__).debug("oneDNN Graph attention unavailable (%s); using SDPA", exc)
        return None


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = _parameter(size)
        self.bias = _parameter(size)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class Embedding(nn.Module):
    def __init__(self, count: int, size: int):
        super().__init__()
        self.weight = _parameter(count, size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class PatchEmbedding(nn.Module):
    """A Conv2d with kernel = stride = patch size, as ViTs cut images into patches."""

    def __init__(self, channels: int, size: int, patch: int):
        super().__init__()
        self.weight = _parameter(size, channels, patch, patch)
        self.bias = _parameter(size)
        self.patch = patch

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.conv2d(pixels, self.weight, self.bias, stride=self.patch)


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], what: str, prefix: str = "") -> None:
    """Take `module`'s tensors (by name, under `prefix` in the checkpoint) from a checkpoint's state dict;
    name the first one missing."""
    own = module.state_dict()
    missing = sorted(prefix + k for k in own if prefix + k not in state)
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} {what} tensors, e.g. {missing[0]}")
    module.load_state_dict({k: state[prefix + k] for k in own}, assign=True)
