"""BLIP-2 stage 1 on two CPU processes (gloo, DDP), each with half of a global batch, computes the
single-process losses and gradients of that batch: ITC's in-batch negatives come from both ranks."""

import torch

from blipsearch.training.objectives import Batch, Blip2Objective

from ddp import CAPTIONS, IMAGE_IDS, STEPS, assert_same_as_single, ddp_steps, run_two_ranks, steps
from test_training_blip2 import spread, tiny_blip2
from test_training_model import batch_of


def _model():
    model, tokenizer, cfg = tiny_blip2(captions=CAPTIONS)
    return spread(model), tokenizer, cfg


def _global_batch(tokenizer) -> Batch:
    return batch_of(tokenizer, CAPTIONS, IMAGE_IDS, seed=1)


def _worker(rank: int, init_file: str, results):
    _, out, dist = ddp_steps(rank, init_file, _model, Blip2Objective, _global_batch)
    results[rank] = out
    dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    from blipsearch.training.loop import ObjectiveModule

    torch.set_num_threads(1)
    model, tokenizer, cfg = _model()
    single = steps(ObjectiveModule(model, Blip2Objective(cfg.objective)), model,
                   [_global_batch(tokenizer)] * STEPS, lambda v: v)
    results = run_two_ranks(_worker, tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for rank in (0, 1):
        assert_same_as_single(results[rank], single, {"itc_loss", "itm_loss", "itg_loss"})
        assert results[rank][0][1].keys() == trainable  # every Q-Former tensor, no ViT one
