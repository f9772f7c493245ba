"""Every training loss of the package. An objective maps (model, batch, progress) to a dict of named,
weighted losses; the loop sums the dict and never looks inside. BLIP-2 and InstructBLIP objectives join
here as further classes with the same call signature.

BLIP (Li et al. 2022; salesforce/BLIP `blip_pretrain.py`, `blip_retrieval.py`):

- ITC: image [CLS] and text [CLS] projections, normalised; keys are the *momentum* encoders' features of
  the global batch plus a queue of earlier ones. Targets mix the ground truth (captions of the same id)
  with the momentum model's softmaxed similarities: alpha * softmax(sim_m) + (1 - alpha) * truth.
- ITM: the image-grounded text encoder classifies [ENC] as match / no match over B positive pairs and
  2B hard negatives: for each image a text, for each text an image, sampled from the softmaxed ITC
  similarities of the global batch with positives (same id) masked out.
- LM: the decoder predicts the caption after [DEC], cross-entropy with label smoothing 0.1.

Distributed: each rank's loss is its share of the global-batch loss, so DDP's gradient averaging gives
the single-process gradient (see `distributed`); logged values are averaged over ranks by the loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from . import distributed
from .config import ObjectiveConfig

log = logging.getLogger(__name__)


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (B, 3, H, W) normalised
    input_ids: torch.Tensor  # (B, L) [CLS] words [SEP] [PAD]...
    attention_mask: torch.Tensor  # (B, L)
    image_ids: torch.Tensor  # (B,) int64: captions of one image share it
    sample_ids: torch.Tensor  # (B,) int64: unique per (image, caption) pair

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.pixel_values, self.input_ids, self.attention_mask, self.image_ids, self.sample_ids)))


@dataclass(frozen=True)
class Progress:
    step: int  # optimizer steps done
    epoch: float  # epochs done, fractional
    seed: int  # seeds this micro-batch's sampling, identical on every rank


class Objective(Protocol):
    def __call__(self, model, batch: Batch, progress: Progress) -> dict[str, torch.Tensor]: ...


# --- plain loss functions (each tested against a reference implementation) -------------------------

def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets_ij log softmax(logits)_ij."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def positive_targets(ids: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
    """(B,), (K,) -> (B, K): uniform over the keys with the same id; each row sums to 1."""
    positives = (ids[:, None] == key_ids[None, :]).float()
    return positives / positives.sum(dim=1, keepdim=True)


def distillation_targets(sim_m: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """Momentum distillation: alpha * softmax(momentum similarities) + (1 - alpha) * ground truth."""
    return alpha * F.softmax(sim_m, dim=1) + (1.0 - alpha) * targets


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_keys: torch.Tensor,
             text_keys: torch.Tensor, targets_i2t: torch.Tensor, targets_t2i: torch.Tensor,
             temp: torch.Tensor) -> torch.Tensor:
    """Both directions' soft cross-entropy, averaged. Features (B, D) query keys (K, D); temp scalar."""
    sim_i2t = image_feat @ text_keys.t() / temp  # (B, K)
    sim_t2i = text_feat @ image_keys.t() / temp
    return (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2


def sample_hard_negatives(sim: torch.Tensor, positives: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, M) similarities, (N, M) bool positives -> (N,) column indices drawn from softmax(sim) over
    the non-positive columns only: harder negatives (more similar) are drawn more often."""
    weights = F.softmax(sim.float(), dim=1) + 1e-6  # BLIP adds 1e-4: a row whose softmax underflows still samples
    weights = weights.masked_fill(positives, 0.0)
    empty = weights.sum(dim=1) == 0
    if bool(empty.any()):
        raise ValueError(f"{int(empty.sum())} row(s) have no negative in the batch (every caption in it "
                         "belongs to the same image); use larger or shuffled batches")
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float,
            token_count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, L, V) at position t predict labels[:, t + 1]; -100 is ignored.

    The sum over tokens is divided by `token_count` (default: this batch's count); the distributed
    objective passes the global count / world size, so the mean over ranks is the global token mean.
    """
    shifted, targets = logits[:, :-1, :], labels[:, 1:]
    total = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100,
                            reduction="sum", label_smoothing=smoothing)
    count = (targets != -100).sum() if token_count is None else token_count
    return total / count


# --- BLIP -------------------------------------------------------------------------------------------

class BlipObjective:
    """ITC with momentum distillation and queues, ITM with hard negatives, LM; weights from the config."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    def alpha(self, progress: Progress) -> float:
        if self.cfg.alpha_ramp_epochs <= 0:
            return self.cfg.alpha
        return self.cfg.alpha * min(1.0, progress.epoch / self.cfg.alpha_ramp_epochs)

    def __call__(self, model, batch: Batch, progress: Progress) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)
        ids = batch.image_ids if self.cfg.positives == "image" else batch.sample_ids
        input_ids, mask = pad_to_world_length(batch.input_ids, batch.attention_mask, model.ids.pad)
        image_embeds, image_feat = model.encode_image(batch.pixel_values)
        _, text_feat = model.encode_text(input_ids, mask)
        weights, losses = self.cfg.losses, {}
        if "itc" in weights:
            losses["itc_loss"] = self.itc(model, batch.pixel_values, input_ids, mask, image_feat, text_feat,
                                          ids, progress)
        if "itm" in weights:
            losses["itm_loss"] = self.itm(model, input_ids, mask, image_embeds, image_feat, text_feat, ids, progress)
        if "lm" in weights:
            losses["lm_loss"] = self.lm(model, input_ids, mask, image_embeds)
        return {name: weights[name.removesuffix("_loss")] * value for name, value in losses.items()}

    def itc(self, model, pixel_values, input_ids, mask, image_feat, text_feat, ids, progress) -> torch.Tensor:
        with torch.no_grad():
            model.momentum_update()
            _, image_feat_m = model.encode_image(pixel_values, momentum=True)
            _, text_feat_m = model.encode_text(input_ids, mask, momentum=True)
            image_world, text_world, ids_world = (distributed.gather(t) for t in (image_feat_m, text_feat_m, ids))
            image_keys = torch.cat([image_world, model.image_queue.float()])  # (Bw + Q, D)
            text_keys = torch.cat([text_world, model.text_queue.float()])
            truth = positive_targets(ids, torch.cat([ids_world, model.idx_queue]))
            alpha = self.alpha(progress)
            targets_i2t = distillation_targets(image_feat_m @ text_keys.t() / model.temp, truth, alpha)
            targets_t2i = distillation_targets(text_feat_m @ image_keys.t() / model.temp, truth, alpha)
            model.enqueue(image_world, text_world, ids_world)
        return itc_loss(image_feat, text_feat, image_keys, text_keys, targets_i2t, targets_t2i, model.temp)

    def itm(self, model, input_ids, mask, image_embeds, image_feat, text_feat, ids, progress) -> torch.Tensor:
        rows = image_feat.shape[0]
        rank = distributed.current().rank
        with torch.no_grad():
            ids_world = distributed.gather(ids)
            sim = distributed.gather(image_feat) @ distributed.gather(text_feat).t() / model.temp  # (Bw, Bw)
            positives = ids_world[:, None] == ids_world[None, :]
            generator = torch.Generator().manual_seed(progress.seed)
            local = slice(rank * rows, (rank + 1) * rows)  # every rank draws for the global batch, keeps its rows
            neg_text = sample_hard_negatives(sim.cpu(), positives.cpu(), generator)[local].to(ids.device)
            neg_image = sample_hard_negatives(sim.t().cpu(), positives.t().cpu(), generator)[local].to(ids.device)
        ids_all, mask_all = distributed.gather(input_ids), distributed.gather(mask)
        image_all = distributed.gather_with_grad(image_embeds)
        texts = torch.cat([input_ids, input_ids, ids_all[neg_text]])  # (3B, L)
        masks = torch.cat([mask, mask, mask_all[neg_text]])
        images = torch.cat([image_embeds, image_all[neg_image], image_embeds])  # (3B, T, Hv)
        logits = model.itm_logits(texts, masks, images)
        labels = torch.cat([torch.ones(rows, dtype=torch.long, device=logits.device),
                            torch.zeros(2 * rows, dtype=torch.long, device=logits.device)])
        return itm_loss(logits, labels)

    def lm(self, model, input_ids, mask, image_embeds) -> torch.Tensor:
        labels = input_ids.masked_fill(mask == 0, -100)
        logits = model.lm_logits(input_ids, mask, image_embeds)
        world = distributed.current().size
        count = distributed.all_reduce_sum((labels[:, 1:] != -100).sum()).float() / world
        return lm_loss(logits, labels, self.cfg.label_smoothing, count)


def pad_to_world_length(input_ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (B, L) token tensors to the longest L on any rank, so texts can be gathered and mixed."""
    length = distributed.max_over_ranks(input_ids.shape[1], input_ids.device)
    extra = length - input_ids.shape[1]
    if extra == 0:
        return input_ids, mask
    return F.pad(input_ids, (0, extra), value=pad_id), F.pad(mask, (0, extra), value=0)


OBJECTIVES = {"blip": BlipObjective}


def build_objective(family: str, cfg: ObjectiveConfig) -> Objective:
    return OBJECTIVES[family](cfg)
