"""Two CPU processes (gloo, DDP) against one: a harness shared by each family's distributed test.

A model's objective runs STEPS steps on halves of a global batch in two processes and on the whole batch
in one; the losses (averaged over ranks) and the gradients must agree.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from blipsearch.training.objectives import Batch, Progress

CAPTIONS = ["a red circle left of a blue square", "a small green triangle", "a blue square above a red circle",
            "a red circle", "a small green triangle and a red circle", "a blue square left of a green triangle"]
IMAGE_IDS = [0, 1, 2, 0, 3, 2]  # captions of one image on both ranks: positives across ranks
STEPS = 2


def global_batch(tokenizer) -> Batch:
    """The batch both processes split: CAPTIONS with IMAGE_IDS and random pixels."""
    from test_training_model import batch_of

    return batch_of(tokenizer, CAPTIONS, IMAGE_IDS, seed=1)


def single_process(build: Callable, objective: Callable):
    """(model, per-step losses and gradients) of one process on the whole global batch."""
    from blipsearch.training.loop import ObjectiveModule

    with one_torch_thread():
        model, tokenizer, cfg = build()
        return model, steps(ObjectiveModule(model, objective(cfg.objective)), model,
                            [global_batch(tokenizer)] * STEPS, lambda v: v)


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread (as each rank runs), and back to the test process's count after: tests that run
    later would otherwise run single-threaded, and the CPU fast paths that need two threads (chunks) never."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def half(batch: Batch, rank: int) -> Batch:
    rows = slice(rank * 3, rank * 3 + 3)

    def cut(ids, mask):  # each rank pads to its own longest text
        keep = int(mask[rows].sum(1).max())
        return ids[rows, :keep], mask[rows, :keep]

    out = Batch(batch.pixel_values[rows], *cut(batch.input_ids, batch.attention_mask), batch.image_ids[rows],
                batch.sample_ids[rows])
    if batch.instruction_ids is not None:  # InstructBLIP's instructions, for the Q-Former and the LM
        out.instruction_ids, out.instruction_mask = cut(batch.instruction_ids, batch.instruction_mask)
        out.prompt_ids, out.prompt_mask = cut(batch.prompt_ids, batch.prompt_mask)
    return out


def steps(module, model, batches, world_mean) -> list[tuple[dict, dict]]:
    """STEPS forward/backward passes; per step the losses (averaged over ranks) and the gradients."""
    out = []
    for step, batch in enumerate(batches):
        losses = module(batch, Progress(step, 0.5, seed=step))
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        out.append(({k: float(world_mean(v.detach())) for k, v in losses.items()}, grads))
    return out


def run_two_ranks(worker: Callable, tmp_path) -> dict:
    """`worker(rank, init_file, results)` in two spawned processes; returns `results` by rank."""
    results = mp.Manager().dict()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    return dict(results)


def ddp_steps(rank: int, init_file: str, build: Callable, objective: Callable, make_batch: Callable | None = None):
    """In a worker: `build()` -> (model, tokenizer, cfg); the rank's half of `make_batch(tokenizer)` (default:
    `global_batch`)."""
    import torch.distributed as dist

    from blipsearch.training import distributed
    from blipsearch.training.loop import ObjectiveModule, no_buffer_sync

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model, tokenizer, cfg = build()
    module = torch.nn.parallel.DistributedDataParallel(ObjectiveModule(model, objective(cfg.objective)),
                                                       **no_buffer_sync())
    batch = (make_batch or global_batch)(tokenizer)
    out = steps(module, model, [half(batch, rank)] * STEPS, distributed.all_reduce_mean)
    return model, out, dist


def assert_same_as_single(ranked: list[tuple[dict, dict]], single: list[tuple[dict, dict]], loss_names: set[str]):
    for (losses, grads), (ref_losses, ref_grads) in zip(ranked, single, strict=True):
        assert losses.keys() == ref_losses.keys() == loss_names
        for name, value in losses.items():
            assert abs(value - ref_losses[name]) < 1e-5, (name, value, ref_losses[name])
        assert grads.keys() == ref_grads.keys()
        # DDP's averaged gradient equals the single-process gradient, up to float32 summation order
        ours = torch.cat([grads[n].flatten() for n in sorted(grads)])
        ref = torch.cat([ref_grads[n].flatten() for n in sorted(grads)])
        torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
        assert float((ours - ref).norm() / ref.norm()) < 1e-5
