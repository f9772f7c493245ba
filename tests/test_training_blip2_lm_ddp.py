"""BLIP-2 stage 2 and InstructBLIP on two CPU processes (gloo, DDP), each with half of a global batch, compute
the single-process loss and gradients of that batch: the LM loss is a mean over the tokens of both ranks."""

import os
from pathlib import Path

import pytest
import torch
from test_training_blip2_lm import save_tiny_opt, save_tiny_t5, stage2_config

from blipsearch.training.objectives import Blip2LMObjective, InstructBlipObjective

from ddp import CAPTIONS, assert_same_as_single, ddp_steps, global_batch, run_two_ranks, single_process, steps
from tiny_blip2 import save_tiny_blip2

PATHS = "BLIPSEARCH_TEST_STAGE2"  # where the spawned ranks find the checkpoints


def _model(*overrides: str):
    from blipsearch.training.loop import prepare_model

    stage1, lm = os.environ[PATHS].split(os.pathsep)
    cfg = stage2_config((Path(stage1), Path(lm)), Path(stage1).parent / "out", *overrides)
    torch.manual_seed(0)  # the projection starts random: the same on every rank
    model, tokenizer = prepare_model(cfg, [], Path(stage1).parent, is_main=False)
    return model.eval(), tokenizer, cfg  # eval: no Q-Former dropout, so ranks and the single process agree


def _worker(rank: int, init_file: str, results):
    _, out, dist = ddp_steps(rank, init_file, _model, Blip2LMObjective)
    results[rank] = out
    dist.destroy_process_group()


def _instructblip():
    return _model("model.family=instructblip")


def _instruction_batch(tokenizer):
    """The harness's global batch, with an instruction per row as the training Collate builds it."""
    from transformers import AutoTokenizer

    from blipsearch.training.data import Collate

    stage1 = os.environ[PATHS].split(os.pathsep)[0]
    collate = Collate(tokenizer, 35, qformer_tokenizer=AutoTokenizer.from_pretrained(stage1))
    batch = global_batch(tokenizer)
    items = [{"pixels": None, "caption": caption, "instruction": asked}
             for caption, asked in zip(CAPTIONS, ["what is it", "describe the picture", "where is the red circle",
                                                  "what colour", "what is on the left", "how many"], strict=True)]
    collate.instructions(batch, items)
    return batch


def _instruct_worker(rank: int, init_file: str, results):
    _, out, dist = ddp_steps(rank, init_file, _instructblip, InstructBlipObjective, _instruction_batch)
    results[rank] = out
    dist.destroy_process_group()


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    stage1, lm = save_tiny_blip2(tmp_path / "stage1", image_token=False), save_tiny_opt(tmp_path / "opt")
    monkeypatch.setenv(PATHS, f"{stage1}{os.pathsep}{lm}")


@pytest.fixture
def t5_checkpoints(tmp_path, monkeypatch):
    stage1, lm = save_tiny_blip2(tmp_path / "stage1", image_token=False), save_tiny_t5(tmp_path / "t5")
    monkeypatch.setenv(PATHS, f"{stage1}{os.pathsep}{lm}")


def _t5_prefix_lm():
    return _model("objective.caption_prompt=")  # no prompt: each caption cut at a random token


def _t5_worker(rank: int, init_file: str, results):
    _, out, dist = ddp_steps(rank, init_file, _t5_prefix_lm, Blip2LMObjective)
    results[rank] = out
    dist.destroy_process_group()


def test_t5_prefix_lm_two_processes_equal_one_process(t5_checkpoints, tmp_path):
    """The random cut of each caption follows the sample, not its row on a rank."""
    _, single = single_process(_t5_prefix_lm, Blip2LMObjective)
    results = run_two_ranks(_t5_worker, tmp_path)
    for rank in (0, 1):
        assert_same_as_single(results[rank], single, {"lm_loss"})


def test_two_processes_equal_one_process_on_the_global_batch(checkpoints, tmp_path):
    model, single = single_process(_model, Blip2LMObjective)
    results = run_two_ranks(_worker, tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for rank in (0, 1):
        assert_same_as_single(results[rank], single, {"lm_loss"})
        assert results[rank][0][1].keys() == trainable  # queries, Q-Former, projection: no LM or ViT tensor


def test_instructblip_two_processes_equal_one_process_on_the_global_batch(checkpoints, tmp_path):
    from blipsearch.training.loop import ObjectiveModule

    model, tokenizer, cfg = _instructblip()
    single = steps(ObjectiveModule(model, InstructBlipObjective(cfg.objective)), model,
                   [_instruction_batch(tokenizer)] * 2, lambda v: v)
    results = run_two_ranks(_instruct_worker, tmp_path)
    for rank in (0, 1):
        assert_same_as_single(results[rank], single, {"lm_loss"})
