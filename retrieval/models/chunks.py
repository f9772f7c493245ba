"""Batches on the CPU in fp32 computed as independent chunks, one thread per core, each thread running its
chunk with torch single-threaded: images through the vision tower, candidates through the ITM pass.

torch splits every op of a batch over its threads and joins them at the op's end: a ViT-B layer is ~15 such
joins (layer norms, GEMMs, attention, GELU, residual adds), and each waits for the slower thread. Chunks of
whole images need none: every thread runs whole layers on its own rows. Measured on the 2-core AVX2 EPYC in
fp32, A/B in one process (`benchmarks/bench_index.py` and `bench_query.py` run them end to end):
- BLIP ViT-B/16 at 384 px over 16 images: 72-73% of the same-run matmul peak with torch's threads, 80-85% in
  chunks of 4, the features bit-identical;
- the torch text tower's ITM pass over 32 candidates (a 10-token query): median 1,181 -> 972 ms in two chunks
  of 16 (1,027 in four of 8), the logits bit-identical;
- BLIP-2's EVA ViT-g/14 at 224 px over 8 images: 31.0, 26.4 s with torch's threads, 26.8, 26.6 s in chunks
  of 2 (80% -> 86% of the peak by the medians), the features bit-identical.
bf16 (CPUs with bf16 units) and other devices keep torch's own threads: not measured there. BLIP-2's ITM
pass (the Q-Former) keeps them too: not measured.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

Output = TypeVar("Output", torch.Tensor, tuple)


def run_in_chunks(compute: Callable[..., Output], *batches: torch.Tensor, chunks_per_thread: int = 1) -> Output:
    """`compute(*batches)`, computed as chunks of the batches (each split alike along its first axis) in
    parallel where that pays: the first batch in fp32 on the CPU, every batch as long, torch allowed more than
    one thread in the calling thread, inference. `chunks_per_thread` > 1 makes smaller chunks, so that a
    thread that finishes early takes another. The chunks' outputs (a tensor, or a tuple of tensors, batch
    first) are joined in order. Elsewhere `compute(*batches)` as it is."""
    first = batches[0]
    threads = min(torch.get_num_threads(), first.shape[0])
    if (threads < 2 or first.device.type != "cpu" or first.dtype != torch.float32
            or any(batch.shape[0] != first.shape[0] for batch in batches)
            or not (torch.is_inference_mode_enabled() or not torch.is_grad_enabled())):
        return compute(*batches)
    size = math.ceil(first.shape[0] / (threads * chunks_per_thread))

    def one(chunk: tuple[torch.Tensor, ...]) -> Output:
        with torch.inference_mode():  # grad mode is per thread: the caller's does not reach the pool's threads
            return compute(*chunk)

    outputs = list(_pool(threads).map(one, zip(*(batch.split(size) for batch in batches), strict=True)))
    if isinstance(outputs[0], torch.Tensor):
        return torch.cat(outputs)
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))


def _single_threaded(default: int) -> None:
    """A pool thread's start: torch single-threaded in it, for good, and in no other thread.

    torch's thread count is per thread (OpenMP's and MKL's settings), taken from a process-wide default at a
    thread's first torch call; `torch.set_num_threads` sets both the calling thread's count and that default.
    So this thread makes its first call (which fixes its count, whatever the default becomes later), sets its
    own count to 1, and puts the default back from a short-lived thread. Every pool thread ends so, and all put
    back the same value: the last to write leaves the default as it was (for threads started later, e.g. a
    server's)."""
    torch.get_num_threads()
    torch.set_num_threads(1)
    _in_new_thread(torch.set_num_threads, default)


def _in_new_thread(call: Callable[..., Any], *args: Any) -> Any:
    result = []
    thread = threading.Thread(target=lambda: result.append(call(*args)), name="encode-settings")
    thread.start()
    thread.join()
    return result[0]


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    default = _in_new_thread(torch.get_num_threads)  # a new thread's first call reads the process's default
    return ThreadPoolExecutor(threads, thread_name_prefix="encode", initializer=_single_threaded,
                              initargs=(default,))


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: its pools start afresh
    os.register_at_fork(after_in_child=_pool.cache_clear)
