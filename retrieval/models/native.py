"""bf16 self-attention on the bf16 dot-product unit (`attention_bf16.c`), built with the machine's C compiler.

torch on CPU has no bf16 product with an fp32 output: its fused attention for bf16 either widens q, k and v
to fp32 (oneDNN Graph's, which `layers.attention` uses on CPUs with AVX512-BF16 and no AMX) and multiplies at
the fp32 rate, or rounds the scores. This kernel keeps the scores and the softmax in fp32 and multiplies bf16
pairs in hardware, rounding only the probabilities (as torch's bf16 flash kernel does) and the output. On the
2-core AVX512-BF16 EPYC, one thread, 8 images x 12 heads x 577 tokens: 54 ms against the oneDNN kernel's
101-105 ms (153 against 78 GFLOP/s), max error against float64 as torch's flash kernel's (0.0021 on random
inputs; 0.0092 and 0.015 with the queries scaled 3x and 6x, where fp32 rounded to bf16 errs 0.0078, 0.015).

Built once per machine (about a second) into the user's cache folder, named by a hash of the source and
flags, then loaded with ctypes; each process checks it against float64 on small problems before its first
use. Only on x86-64 Linux CPUs with AVX512-BF16 and without AMX (AMX CPUs keep torch's flash kernel, which
runs on the tiles), for heads 64 wide (BLIP's ViT-B and ViT-L; BLIP-2's ViT-g has 88). Without a C compiler,
or where building or the check fails, `attention` returns None and the caller keeps torch's kernels; the
reason is logged at debug level. `BLIPSEARCH_NATIVE=0` in the environment turns the kernel off (to compare,
or to rule it out). The check holds the kernel to torch's own bf16 flash kernel's error (times CHECK_MARGIN):
a torch whose bf16 attention grew more exact would turn it off, never let a worse one through.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention_bf16.c")
FLAGS = ("-O3", "-std=gnu11", "-fno-strict-aliasing", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
         "-mavx512bf16", "-mfma", "-fPIC", "-shared")  # bf16 pairs are read as 32-bit words: no aliasing rules
HEAD_SIZE = 64  # the kernel's head width
COMPILE_TIMEOUT_S = 120
SWITCH = "BLIPSEARCH_NATIVE"  # 0: never build or use the kernel (torch's kernels, as without a compiler)
# the check before first use: max error against float64, as a multiple of torch's own bf16 flash kernel's
CHECK_MARGIN = 1.5


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(64)) v over (B, heads, T, 64) bf16 CPU views (each with its last dimension
    contiguous), or None where this kernel does not apply (then the caller computes it). The output is a
    (B, heads, T, 64) view of a contiguous (B, T, heads, 64) tensor: merging its heads costs no copy.
    Runs on torch's thread count for the calling thread (1 in `chunks`' threads)."""
    if not _suits(q, k, v):
        return None
    kernel = _kernel()
    if kernel is None:
        return None
    return _run(kernel, q, k, v)


def _suits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if not all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.dim() == 4 for t in (q, k, v)):
        return False
    if q.shape != k.shape or q.shape != v.shape or q.shape[-1] != HEAD_SIZE or q.shape[2] == 0:
        return False
    # pairs of bf16 are read as 32-bit words: every row must start at an even element
    return all(t.stride(-1) == 1 and t.data_ptr() % 4 == 0 and all(s % 2 == 0 for s in t.stride()[:3])
               for t in (q, k, v))


def _run(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, heads, t, d = q.shape
    out = _output(b, t, heads, d)
    strides = [s for x in (q, k, v) for s in (x.stride(0), x.stride(2), x.stride(1))] + \
        [out.stride(0), out.stride(1), out.stride(2)]
    array = (ctypes.c_int64 * 12)(*strides)
    pointers = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr())
    total = b * heads
    threads = torch.get_num_threads()
    parts = max(1, min(threads, total))

    def part(i: int) -> int:  # ctypes releases the GIL for the call: the parts run in parallel
        return kernel(*pointers, heads, total * i // parts, total * (i + 1) // parts, t, array, d ** -0.5)

    if parts == 1:
        codes = [part(0)]
    else:  # `chunks`' pool: its threads are torch-single-threaded, which a ctypes call does not mind
        from .chunks import _pool  # (chunks imports layers, which imports this module)

        codes = list(_pool(threads).map(part, range(parts)))
    if any(codes):
        raise MemoryError("attention kernel: out of memory for its packing buffers")
    return out.transpose(1, 2)


def _output(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, dtype=torch.bfloat16)


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads, and one may have held the build lock: a fresh lock
    (`chunks` starts its pools afresh there too); the loaded library stays valid."""
    global _BUILD_LOCK
    _BUILD_LOCK = threading.Lock()


def _kernel():
    """The built, loaded and checked kernel function, or None (the reason logged); once per process."""
    with _BUILD_LOCK:  # chunks' threads meet here on the first batch: one builds, the others wait
        return _built_kernel()


_BUILD_LOCK = threading.Lock()


@functools.cache
def _built_kernel():
    reason = _unsupported()
    if reason is None:
        try:
            built = _build()
            try:
                kernel = _load(built)
            except OSError:  # a cached build that no longer loads (a damaged file): built again, once
                built.unlink(missing_ok=True)
                kernel = _load(_build())
            reason = _check(kernel)
            if reason is None:
                return kernel
        except Exception as exc:  # a missing symbol, memory, a failed build: any failure only costs speed
            reason = f"could not build, load or check it ({type(exc).__name__}: {exc})"
    log.debug("bf16 attention kernel not used: %s", reason)
    return None


def _unsupported() -> str | None:
    if os.environ.get(SWITCH, "1") == "0":
        return f"turned off ({SWITCH}=0)"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return "not x86-64 Linux"
    if not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "no AVX512-BF16"
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX CPU (torch's flash kernel runs on its tiles)"
    if _compiler() is None:
        return "no C compiler (cc, or $CC)"
    return None


def _compiler() -> list[str] | None:
    """The C compiler's command ($CC may carry arguments, e.g. `ccache gcc`); None where there is none."""
    command = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
    found = shutil.which(command[0])
    return [found, *command[1:]] if found else None


def _build() -> Path:
    """The shared library, built into the user's cache folder unless already there; where that cannot be
    written, into a new private temporary folder (never one a name could be guessed for: another user could
    have put a library there), once per process."""
    source = SOURCE.read_bytes()
    name = f"attention_bf16-{hashlib.sha256(source + ' '.join(FLAGS).encode()).hexdigest()[:16]}.so"
    for folder in _folders():
        built = folder / name
        if built.exists():
            return built
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, name_partial = tempfile.mkstemp(prefix=".building-", suffix=".so", dir=folder)
            os.close(handle)
            partial = Path(name_partial)
        except OSError:
            continue
        try:
            subprocess.run([*_compiler(), *FLAGS, str(SOURCE), "-o", str(partial)], check=True,
                           capture_output=True, timeout=COMPILE_TIMEOUT_S)
            os.replace(partial, built)  # whole, or not at all: another process may load it at once
        finally:
            partial.unlink(missing_ok=True)
        return built
    raise OSError("no writable folder to build the kernel in")


@functools.cache
def _private_folder() -> Path:
    """A temporary folder of this process's own (mode 0o700), removed when it exits (the loaded library stays
    mapped)."""
    folder = Path(tempfile.mkdtemp(prefix="blipsearch-kernels-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _folders() -> Iterator[Path]:
    """Where to build, in order; the private folder is made only when the cache folder cannot be written."""
    import platformdirs

    yield platformdirs.user_cache_path("blipsearch") / "kernels"
    yield _private_folder()


def _load(path: Path):
    function = ctypes.CDLL(str(path)).attention_bf16
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_float]
    return function


def _check(kernel) -> str | None:
    """None where the kernel matches float64 within CHECK_MARGIN x torch's flash kernel's error (plus 1e-3) on
    small problems that take every path of its blocking: 9, 20, 37, 64, 83 and 130 tokens (key tails of 1, 2
    and 3 vectors after 0, 1 or 2 whole blocks of 64, or none; row tails of 1 to 5), strided q/k/v as a ViT's
    qkv projection gives them, peaked and flat heads; else why not."""
    generator = torch.Generator().manual_seed(0)
    for tokens in (9, 20, 37, 64, 83, 130):
        qkv = torch.randn(2, tokens, 3, 3, HEAD_SIZE, generator=generator)
        qkv[:, :, 0, 0] *= 6  # one head with peaked attention
        qkv = qkv.bfloat16()
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        with torch.inference_mode():
            got = _run(kernel, q, k, v).double()
            flash = torch.nn.functional.scaled_dot_product_attention(q, k, v).double()
        exact = torch.softmax(q.double() @ k.double().transpose(-1, -2) / HEAD_SIZE ** 0.5, dim=-1) @ v.double()
        error, bound = (got - exact).abs().max().item(), (flash - exact).abs().max().item() * CHECK_MARGIN + 1e-3
        if not error <= bound:  # NaN fails too
            return f"its check failed at {tokens} tokens (error {error:.4f} against float64, allowed {bound:.4f})"
    return None

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
