"""A batch of images encoded on the CPU in fp32 as independent chunks, one thread per core, each thread
computing its chunk with torch single-threaded.

torch splits every op of a batch over its threads and joins them at the op's end: a ViT-B layer is ~15 such
joins (layer norms, GEMMs, attention, GELU, residual adds), and each waits for the slower thread. Chunks of
whole images need none: every thread runs whole layers on its own images. Measured on the 2-core AVX2 EPYC,
BLIP ViT-B/16 at 384 px over 16 images in fp32 (`benchmarks/bench_index.py` runs it end to end): 72-73% of
the same-run matmul peak with torch's threads, 80-85% in chunks, the features bit-identical. bf16 (CPUs with
bf16 units) and other devices keep torch's own threads: not measured there.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

Output = TypeVar("Output", torch.Tensor, tuple)

CHUNKS_PER_THREAD = 2  # a thread that finishes early takes another chunk: 4 chunks of 4 for 16 images on 2 cores


def encode_in_chunks(encode: Callable[[torch.Tensor], Output], batch: torch.Tensor) -> Output:
    """`encode(batch)`, computed as chunks of the batch in parallel where that pays (fp32 on the CPU, torch
    allowed more than one thread in the calling thread, inference); the chunks' outputs (a tensor, or a tuple
    of tensors, batch first) are joined in order. Elsewhere `encode(batch)` as it is."""
    threads = min(torch.get_num_threads(), batch.shape[0])
    if (threads < 2 or batch.device.type != "cpu" or batch.dtype != torch.float32
            or not (torch.is_inference_mode_enabled() or not torch.is_grad_enabled())):
        return encode(batch)
    size = math.ceil(batch.shape[0] / (threads * CHUNKS_PER_THREAD))

    def one(chunk: torch.Tensor) -> Output:
        with torch.inference_mode():  # grad mode is per thread: the caller's does not reach the pool's threads
            return encode(chunk)

    outputs = list(_pool(threads).map(one, batch.split(size)))
    if isinstance(outputs[0], torch.Tensor):
        return torch.cat(outputs)
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))


def _single_threaded() -> None:
    torch.set_num_threads(1)  # this thread's own setting: other threads keep theirs


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="encode", initializer=_single_threaded)


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: its pools start afresh
    os.register_at_fork(after_in_child=_pool.cache_clear)
