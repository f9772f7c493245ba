"""BLIP-2 stage 1 on two CPU processes (gloo, DDP), each with half of a global batch, computes the
single-process losses and gradients of that batch: ITC's in-batch negatives come from both ranks."""

from blipsearch.training.objectives import Blip2Objective

from ddp import CAPTIONS, assert_same_as_single, ddp_steps, run_two_ranks, single_process
from test_training_blip2 import spread, tiny_blip2


def _model():
    model, tokenizer, cfg = tiny_blip2(captions=CAPTIONS)
    return spread(model), tokenizer, cfg


def _worker(rank: int, init_file: str, results):
    _, out, dist = ddp_steps(rank, init_file, _model, Blip2Objective)
    results[rank] = out
    dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    model, single = single_process(_model, Blip2Objective)
    results = run_two_ranks(_worker, tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for rank in (0, 1):
        assert_same_as_single(results[rank], single, {"itc_loss", "itm_loss", "itg_loss"})
        assert results[rank][0][1].keys() == trainable  # every Q-Former tensor, no ViT one
