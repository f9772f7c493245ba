"""Two CPU processes (gloo, DDP) on halves of a global batch compute the single-process losses and
gradients of that batch, and keep identical queues."""

import os

import torch
import torch.multiprocessing as mp

from blipsearch.training.objectives import Batch, BlipObjective, Progress

from test_training_model import batch_of, tiny

CAPTIONS = ["a red circle left of a blue square", "a small green triangle", "a blue square above a red circle",
            "a red circle", "a small green triangle and a red circle", "a blue square left of a green triangle"]
IMAGE_IDS = [0, 1, 2, 0, 3, 2]  # captions of one image on both ranks: positives across ranks
STEPS = 2


def _global_batch(tokenizer) -> Batch:
    return batch_of(tokenizer, CAPTIONS, IMAGE_IDS, seed=1)


def _half(batch: Batch, rank: int) -> Batch:
    rows = slice(rank * 3, rank * 3 + 3)
    keep = int(batch.attention_mask[rows].sum(1).max())  # each rank pads to its own longest caption
    return Batch(batch.pixel_values[rows], batch.input_ids[rows, :keep], batch.attention_mask[rows, :keep],
                 batch.image_ids[rows], batch.sample_ids[rows])


def _steps(module, model, batches, world_mean):
    """STEPS forward/backward passes; per step the losses (averaged over ranks) and the gradients."""
    out = []
    for step, batch in enumerate(batches):
        losses = module(batch, Progress(step, 0.5, seed=step))
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        out.append(({k: float(world_mean(v.detach())) for k, v in losses.items()}, grads))
    return out


def _worker(rank: int, init_file: str, results):
    import torch.distributed as dist

    from blipsearch.training import distributed
    from blipsearch.training.loop import ObjectiveModule, no_buffer_sync

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model, tokenizer, cfg = tiny()
    module = torch.nn.parallel.DistributedDataParallel(ObjectiveModule(model, BlipObjective(cfg.objective)),
                                                       **no_buffer_sync())
    batch = _half(_global_batch(tokenizer), rank)
    steps = _steps(module, model, [batch] * STEPS, distributed.all_reduce_mean)
    queues = (model.image_queue.clone(), model.idx_queue.clone(), int(model.queue_ptr))
    results[rank] = (steps, queues)
    dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    torch.set_num_threads(1)
    model, tokenizer, cfg = tiny()
    from blipsearch.training.loop import ObjectiveModule

    single = _steps(ObjectiveModule(model, BlipObjective(cfg.objective)), model,
                    [_global_batch(tokenizer)] * STEPS, lambda v: v)

    results = mp.Manager().dict()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in (0, 1):
        steps, (image_queue, idx_queue, ptr) = results[rank]
        for (losses, grads), (ref_losses, ref_grads) in zip(steps, single, strict=True):
            assert losses.keys() == ref_losses.keys() == {"itc_loss", "itm_loss", "lm_loss"}
            for name, value in losses.items():
                assert abs(value - ref_losses[name]) < 1e-5, (rank, name, value, ref_losses[name])
            assert grads.keys() == ref_grads.keys()
            # DDP's averaged gradient equals the single-process gradient, up to float32 summation order
            ours = torch.cat([grads[n].flatten() for n in sorted(grads)])
            ref = torch.cat([ref_grads[n].flatten() for n in sorted(grads)])
            torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
            assert float((ours - ref).norm() / ref.norm()) < 1e-5
        torch.testing.assert_close(image_queue, model.image_queue)
        assert idx_queue.tolist() == model.idx_queue.tolist() and ptr == int(model.queue_ptr)
