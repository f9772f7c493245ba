"""Batches on the CPU in fp32 or bf16 computed as independent chunks, one thread per core, each thread
running its chunk with torch single-threaded: images through the vision tower, candidates through the ITM pass.

torch splits every op of a batch over its threads and joins them at the op's end: a ViT-B layer is ~15 such
joins (layer norms, GEMMs, attention, GELU, residual adds), and each waits for the slower thread. Chunks of
whole images need none: every thread runs whole layers on its own rows. Measured on the 2-core AVX2 EPYC in
fp32, A/B in one process (`benchmarks/bench_index.py` and `bench_query.py` run them end to end):
- BLIP ViT-B/16 at 384 px over 16 images (two probes of 3 rounds): 72-73% of the same-run matmul peak with
  torch's threads, 80-85% in chunks (chunks of 8: 85% and 80%; of 4: 85%; of 1: 82%), the features
  bit-identical;
- the torch text tower's ITM pass over 32 candidates (a 10-token query): median 1,181 -> 972 ms in two chunks
  of 16 (1,027 in four of 8), the logits bit-identical;
- BLIP-2's EVA ViT-g/14 at 224 px over 8 images, 4 alternating rounds: 32.4, 30.5, 32.8, 29.2 s with torch's
  threads, 29.6, 27.9, 27.1, 25.8 s in chunks of 2 (75% -> 86% of the peak by the medians), faster in every
  round, the features bit-identical (an earlier probe of 2 rounds: 31.0, 26.4 against 26.8, 26.6 s).
And in bf16 on the 2-core AVX512-BF16 EPYC (no AMX), two rounds in one process: the same ViT over 16 images
76% and 77% of the bf16 peak (418 GFLOP/s) with torch's threads, 81% and 80% in chunks of 4 (83%, 80% in
chunks of 8); the ITM pass over 32 candidates 465 and 486 ms with torch's threads, 433 and 455 ms in two
chunks of 16 (469, 495 in four of 8); features and logits bit-identical. `blipsearch index` of 160 12 MP
photos there: 68% -> 70% of the peak (2.52 -> 2.60 images/s). CPUs with AMX keep torch's threads in bf16,
as do fp16 and other devices: not measured there. BLIP-2's image tower in bf16 runs in chunks as BLIP's does
(measured in fp32 only); its ITM pass (the Q-Former) keeps torch's threads: not measured.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from . import layers

Output = TypeVar("Output", torch.Tensor, tuple)


def run_in_chunks(compute: Callable[..., Output], *batches: torch.Tensor, chunks_per_thread: int = 1) -> Output:
    """`compute(*batches)`, computed as chunks of the batches (each split alike along its first axis) in
    parallel where that pays: the first batch in fp32 on the CPU (or bf16 without AMX), every batch as long,
    torch allowed more than one thread in the calling thread, grad off (inference mode or `no_grad`), and no
    autocast or dispatch mode (a FLOP counter, say) on in the calling thread, which would not reach the pool's
    threads.
    `chunks_per_thread` > 1 makes smaller chunks, so that a thread that finishes early takes another. The
    chunks' outputs (a tensor, or a tuple of tensors, batch first) are joined in order. Elsewhere
    `compute(*batches)` as it is."""
    first = batches[0]
    allowed = torch.get_num_threads()
    threads = min(allowed, first.shape[0])
    if (threads < 2 or first.device.type != "cpu" or first.dtype not in (torch.float32, torch.bfloat16)
            or (first.dtype == torch.bfloat16 and layers._has_amx())
            or any(batch.shape[0] != first.shape[0] for batch in batches)
            or torch.is_grad_enabled() or _thread_local_modes()):
        return compute(*batches)
    size = math.ceil(first.shape[0] / (threads * chunks_per_thread))

    def one(chunk: tuple[torch.Tensor, ...]) -> Output:
        with torch.inference_mode():  # grad mode is per thread: the caller's does not reach the pool's threads
            return compute(*chunk)

    outputs = list(_pool(allowed).map(one, zip(*(batch.split(size) for batch in batches), strict=True)))
    if isinstance(outputs[0], torch.Tensor):
        return torch.cat(outputs)
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))


def _thread_local_modes() -> bool:
    """autocast, or a dispatch mode (torch's FLOP counter, a debugging mode), on in the calling thread."""
    if torch.is_autocast_enabled("cpu"):
        return True
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode  # private: absent, assume none
    except ImportError:
        return False
    return _get_current_dispatch_mode() is not None


_POOLS: dict[int, ThreadPoolExecutor] = {}  # by the calling thread's torch thread count
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    """The pool of `threads` threads, every one started (and set single-threaded) before it is first used.

    torch's thread count is per thread (OpenMP's and MKL's settings), taken from a process-wide default at a
    thread's first torch call, and `torch.set_num_threads` sets both the calling thread's count and that
    default. So each pool thread makes its first call (which fixes its count, whatever the default becomes
    later), sets its own count to 1, and puts the default back from a short-lived thread; all put back the
    value read when the pool was made, so the last to write leaves the default as it was, for threads started
    later (a server's request threads, say). Another thread whose first torch call falls while a pool is
    being made may take 1 from the default for good: a window of milliseconds, once per thread count."""
    with _POOLS_LOCK:
        if threads not in _POOLS:
            default = _in_new_thread(torch.get_num_threads)  # a new thread's first call reads the default
            pool = ThreadPoolExecutor(threads, thread_name_prefix="encode", initializer=_single_threaded,
                                      initargs=(default,))
            started = threading.Barrier(threads)  # each worker holds one task until all have started
            for waited in [pool.submit(started.wait, 60) for _ in range(threads)]:
                waited.result()
            _POOLS[threads] = pool
        return _POOLS[threads]


def _single_threaded(default: int) -> None:
    torch.get_num_threads()
    torch.set_num_threads(1)
    _in_new_thread(torch.set_num_threads, default)


def _in_new_thread(call: Callable[..., Any], *args: Any) -> Any:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, call(*args)))
        except BaseException as exc:  # handed to the caller
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="encode-settings")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads: its pools start afresh."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
