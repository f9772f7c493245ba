"""torch.distributed helpers: process-group setup under torchrun, and the gathers the objectives need.

Every helper is the identity in a single process, so objectives call them unconditionally.

Gradients: `gather_with_grad` returns every rank's rows; in backward each rank receives the *sum* of the
gradients that all ranks' losses put on its rows (BLIP's `GatherLayer`). DDP then averages parameter
gradients over ranks, so a step equals the single-process step on the global batch exactly, provided
each rank's loss is its share of the global mean (see `objectives`). open_clip's `gather_features`
instead splices the local tensor into a no-grad gather, which keeps only the local rank's gradient terms.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    log.info("joined %s process group as rank %d of %d", backend, dist.get_rank(), size)
    return current()


def current() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    # gloo has no bf16 all_gather on every build; float32 travels everywhere and is exact for bf16 values
    wire = tensor.float().contiguous() if tensor.is_floating_point() else tensor.contiguous()
    parts = [torch.empty_like(wire) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, wire)
    return [p.to(tensor.dtype) for p in parts]


@torch.no_grad()
def gather(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world B, ...) in rank order, without gradient."""
    if not _active():
        return tensor
    return torch.cat(_all_gather(tensor), dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows, ctx.dtype = tensor.shape[0], tensor.dtype
        return torch.cat(_all_gather(tensor), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().float()
        dist.all_reduce(grad)  # sum of every rank's gradient on every row
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows].to(ctx.dtype)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world B, ...); the local rows receive the gradients of every rank's loss."""
    if not _active():
        return tensor
    return _GatherWithGrad.apply(tensor).to(tensor.dtype)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, without gradient (counts, logged values)."""
    if not _active():
        return tensor
    out = tensor.detach().clone().float()
    dist.all_reduce(out)
    return out.to(tensor.dtype)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(tensor) / current().size


def max_over_ranks(value: int, device: torch.device | str = "cpu") -> int:
    if not _active():
        return value
    out = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return int(out.item())
