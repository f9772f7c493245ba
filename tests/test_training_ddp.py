"""Two CPU processes (gloo, DDP) on halves of a global batch compute the single-process losses and
gradients of that batch, and keep identical queues."""

import torch

from blipsearch.training.objectives import BlipObjective

from ddp import assert_same_as_single, ddp_steps, run_two_ranks, single_process
from test_training_model import tiny


def _worker(rank: int, init_file: str, results):
    model, out, dist = ddp_steps(rank, init_file, tiny, BlipObjective)
    queues = (model.image_queue.clone(), model.idx_queue.clone(), int(model.queue_ptr))
    results[rank] = (out, queues)
    dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    model, single = single_process(tiny, BlipObjective)
    results = run_two_ranks(_worker, tmp_path)
    for rank in (0, 1):
        ranked, (image_queue, idx_queue, ptr) = results[rank]
        assert_same_as_single(ranked, single, {"itc_loss", "itm_loss", "lm_loss"})
        torch.testing.assert_close(image_queue, model.image_queue)
        assert idx_queue.tolist() == model.idx_queue.tolist() and ptr == int(model.queue_ptr)
