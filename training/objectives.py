"""Every training loss of the package. An objective maps (model, batch, progress) to a dict of named,
weighted losses; the loop sums the dict and never looks inside. One class per family (`OBJECTIVES`), all with
the same call signature; InstructBLIP's would join the same way.

BLIP (Li et al. 2022; salesforce/BLIP `blip_pretrain.py`, `blip_retrieval.py`):

- ITC: image [CLS] and text [CLS] projections, normalised; keys are the *momentum* encoders' features of
  the global batch plus a queue of earlier ones. Targets mix the ground truth (captions of the same id)
  with the momentum model's softmaxed similarities: alpha * softmax(sim_m) + (1 - alpha) * truth.
- ITM: the image-grounded text encoder classifies [ENC] as match / no match over B positive pairs and
  2B hard negatives: for each image a text, for each text an image, sampled from the softmaxed ITC
  similarities of the global batch with positives (same id) masked out.
- LM: the decoder predicts the caption after [DEC], cross-entropy with label smoothing 0.1.

BLIP-2 stage 1 (Li et al. 2023; LAVIS `blip2_qformer.py`), on a frozen image encoder, no momentum, no queue:

- ITC: each image gives Q normalised query vectors, each text its [CLS] vector; the image-text score is the
  max over the queries. Keys are the global batch's online features (gathered with gradient); targets are
  the positives (same id) smoothed by 0.1 as LAVIS's `label_smoothing=0.1` / `0.9 * pos + 0.1 / K`.
- ITM: as BLIP's, sampled from those max-over-queries similarities; queries and text in one sequence, the
  ITM head on the Q query outputs, logits averaged over the queries.
- ITG: the Q-Former's text predicts the caption after [DEC]; the text attends to every query and to the
  earlier text, the queries never to the text (UniLM mask). Label smoothing 0.1.

Both families, off by default: caption negatives (`objective.caption_negatives`, `itm_neg_loss`): ITM ranks
an image's own caption above a caption false for it from the data (e.g. the mirror caption), so that it
learns relation direction and attribute binding that in-batch negatives seldom test.

Distributed: each rank's loss is its share of the global-batch loss, so DDP's gradient averaging gives
the single-process gradient (see `distributed`); logged values are averaged over ranks by the loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Protocol

import torch
import torch.nn.functional as F

from blipsearch.retrieval.errors import InvalidInputError

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
    # caption negatives (None when no sample of the batch has one): N false captions of N of the images
    negative_input_ids: torch.Tensor | None = None  # (N, Ln)
    negative_attention_mask: torch.Tensor | None = None  # (N, Ln)
    negative_rows: torch.Tensor | None = None  # (N,) int64: the row of the image each one is false for
    # InstructBLIP (None otherwise): the instruction for the Q-Former and, as the LM reads it first, for the LM;
    # `input_ids` then holds the answers (LM tokens, no [BOS], ending with the LM's end token)
    instruction_ids: torch.Tensor | None = None  # (B, Li) Q-Former tokens
    instruction_mask: torch.Tensor | None = None
    prompt_ids: torch.Tensor | None = None  # (B, Lp) LM tokens: [BOS] instruction
    prompt_mask: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        return Batch(**{f.name: None if getattr(self, f.name) is None else
                        getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


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


class TrainingDivergedError(InvalidInputError):
    """The losses (or the similarities they come from) are no longer finite numbers."""


def sample_hard_negatives(sim: torch.Tensor, positives: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, M) similarities, (N, M) bool positives -> (N,) column indices drawn from softmax(sim) over
    the non-positive columns only: harder negatives (more similar) are drawn more often."""
    if not bool(torch.isfinite(sim).all()):  # weights the previous step made inf or NaN: multinomial would raise
        raise TrainingDivergedError("the ITC similarities are not finite numbers: the run diverged; lower optim.lr "
                                    "(or raise optim.warmup_steps, set optim.clip_grad) and resume from the last "
                                    "checkpoint with --resume auto")
    weights = F.softmax(sim.float(), dim=1) + 1e-6  # BLIP adds 1e-4: a row whose softmax underflows still samples
    weights = weights.masked_fill(positives, 0.0)
    empty = weights.sum(dim=1) == 0
    if bool(empty.any()):
        raise InvalidInputError(f"{int(empty.sum())} row(s) of a training batch have no negative (every caption "
                                "in it belongs to the same image); use larger batches (data.batch_size) or data "
                                "with more images")
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
            losses.update(caption_negative_losses(model, batch, image_embeds, self.cfg))
        if "lm" in weights:
            losses["lm_loss"] = self.lm(model, input_ids, mask, image_embeds)
        return weighted(losses, loss_weights(self.cfg))

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
        with torch.no_grad():
            sim = distributed.gather(image_feat) @ distributed.gather(text_feat).t() / model.temp  # (Bw, Bw)
        return hard_negative_itm_loss(model, input_ids, mask, image_embeds, sim, ids, progress)

    def lm(self, model, input_ids, mask, image_embeds) -> torch.Tensor:
        return caption_loss(model, input_ids, mask, image_embeds, self.cfg.label_smoothing)


# --- shared by the families ---------------------------------------------------------------------------

def weighted(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """{"itc_loss": value} -> weight of "itc" x value."""
    return {name: weights[name.removesuffix("_loss")] * value for name, value in losses.items()}


def loss_weights(cfg: ObjectiveConfig) -> dict[str, float]:
    """The configured weights, plus `itm_neg` (caption negatives) when it is on."""
    return {**cfg.losses, "itm_neg": cfg.caption_negatives} if cfg.caption_negatives > 0 else cfg.losses


def caption_negative_losses(model, batch: Batch, image_embeds: torch.Tensor,
                            cfg: ObjectiveConfig) -> dict[str, torch.Tensor]:
    """{"itm_neg_loss": ...} when caption negatives are on (every step, so the logged names never change;
    0 for a batch without any), else {}."""
    if cfg.caption_negatives <= 0:
        return {}
    return {"itm_neg_loss": caption_negative_itm_loss(model, batch, image_embeds)}


def caption_negative_itm_loss(model, batch: Batch, image_embeds: torch.Tensor) -> torch.Tensor:
    """Each (image, false caption) pair ranked below the image with its own caption: the logistic loss of
    the difference of their ITM log-odds, -log sigmoid(odds(true) - odds(false)), the mean over the global
    batch's N negatives.

    Pairwise, not the false pairs alone labelled no match: trained that way the head learns to say "no match"
    more often (every caption-negative target is 0) rather than to tell a caption from its mirror, and the
    relation test stays at chance (measured on the demo model: 50.7%, with the true captions' match
    probability falling to 0.15). The pair's difference is the one thing the fused ranking compares.
    A term of its own, weighed by `objective.caption_negatives`; `hard_negative_itm_loss` keeps ITM's
    calibration. Under DDP nothing is gathered: each pair's image and captions lie on the same rank. Only the
    count is summed over ranks, so each rank's loss is its share of the global mean (as `caption_loss`).
    image_embeds (B, T, Hv): what `model.itm_logits` attends; negative captions (N, Ln) of rows (N,).
    """
    world = distributed.current().size
    rows = batch.negative_rows
    local = 0 if rows is None else rows.shape[0]
    count = distributed.all_reduce_sum(torch.tensor(local, device=image_embeds.device))
    if local == 0:
        return torch.zeros((), device=image_embeds.device)
    false = model.itm_logits(batch.negative_input_ids, batch.negative_attention_mask, image_embeds[rows])  # (N, 2)
    true = model.itm_logits(batch.input_ids[rows], batch.attention_mask[rows], image_embeds[rows])  # (N, 2)
    margin = (true[:, 1] - true[:, 0]) - (false[:, 1] - false[:, 0])
    total = F.softplus(-margin).sum()
    return total * world / count.clamp(min=1).float()


def hard_negative_itm_loss(model, input_ids, mask, image_embeds, sim, ids, progress) -> torch.Tensor:
    """ITM over B positives and 2B hard negatives (for each image a text, for each text an image).

    sim (Bw, Bw): image i vs text j over the global batch, no gradient. Every rank draws for the global
    batch with the same seed and keeps its rows, so the draws do not depend on the number of processes.
    `model.itm_logits(texts, masks, image_embeds)` scores pairs; image_embeds (B, T, Hv) are what it attends.
    """
    rows = input_ids.shape[0]
    rank = distributed.current().rank
    with torch.no_grad():
        ids_world = distributed.gather(ids)
        positives = ids_world[:, None] == ids_world[None, :]
        generator = torch.Generator().manual_seed(progress.seed)
        local = slice(rank * rows, (rank + 1) * rows)
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


def caption_loss(model, input_ids, mask, image_embeds, smoothing: float) -> torch.Tensor:
    """Image-grounded captioning: `model.lm_logits` (which puts [DEC] first) predicts each next token.

    With a caption prompt (`model.ids.prompt`), its tokens follow [DEC] and are not predicted (BLIP's
    `decoder_targets[:, :prompt_length] = -100`)."""
    input_ids, mask, labels = with_prompt(input_ids, mask, model.ids.prompt)
    logits = model.lm_logits(input_ids, mask, image_embeds)
    world = distributed.current().size
    count = distributed.all_reduce_sum((labels[:, 1:] != -100).sum()).float() / world
    return lm_loss(logits, labels, smoothing, count)


def with_prompt(input_ids: torch.Tensor, mask: torch.Tensor,
                prompt: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L) [CLS] caption [SEP] -> (B, P + L) [CLS] prompt caption [SEP], its mask, and LM labels (-100 on
    padding and on the prompt)."""
    if prompt:
        rows, count = input_ids.shape[0], len(prompt)
        tokens = torch.tensor(prompt, dtype=input_ids.dtype, device=input_ids.device).expand(rows, count)
        input_ids = torch.cat([input_ids[:, :1], tokens, input_ids[:, 1:]], dim=1)
        mask = torch.cat([mask[:, :1], torch.ones_like(tokens, dtype=mask.dtype), mask[:, 1:]], dim=1)
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, 1:1 + len(prompt)] = -100
    return input_ids, mask, labels


def pad_to_world_length(input_ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (B, L) token tensors to the longest L on any rank, so texts can be gathered and mixed."""
    length = distributed.max_over_ranks(input_ids.shape[1], input_ids.device)
    extra = length - input_ids.shape[1]
    if extra == 0:
        return input_ids, mask
    return F.pad(input_ids, (0, extra), value=pad_id), F.pad(mask, (0, extra), value=0)


# --- BLIP-2 stage 1 ----------------------------------------------------------------------------------

def max_query_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """(N, Q, D) query vectors, (M, D) text vectors -> (N, M): for each pair the best query's dot product."""
    return torch.einsum("nqd,md->nmq", image_feats, text_feats).amax(dim=-1)


def smoothed_targets(ids: torch.Tensor, key_ids: torch.Tensor, smoothing: float) -> torch.Tensor:
    """(B,), (K,) -> (B, K): (1 - smoothing) x uniform over the positives + smoothing / K."""
    return (1.0 - smoothing) * positive_targets(ids, key_ids) + smoothing / key_ids.shape[0]


def query_itc_loss(image_feats: torch.Tensor, text_feat: torch.Tensor, image_keys: torch.Tensor,
                   text_keys: torch.Tensor, targets: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """BLIP-2's ITC, both directions averaged. This rank's image_feats (B, Q, D) and text_feat (B, D);
    the global batch's image_keys (K, Q, D) and text_keys (K, D); targets (B, K) for both directions."""
    sim_i2t = max_query_similarity(image_feats, text_keys) / temp  # (B, K)
    sim_t2i = max_query_similarity(image_keys, text_feat).t() / temp  # (B, K)
    return (soft_cross_entropy(sim_i2t, targets) + soft_cross_entropy(sim_t2i, targets)) / 2


class Blip2Objective:
    """BLIP-2 stage 1: ITC over the query vectors, ITM with hard negatives, ITG; weights from the config.

    The model (`blip2.Blip2PretrainModel`) gives `encode_image` -> frozen ViT tokens (B, T, Hv) and query
    vectors (B, Q, D), `encode_text` -> (B, D), `itm_logits`, `lm_logits` and the temperature `temp`.
    """

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    def __call__(self, model, batch: Batch, progress: Progress) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)  # BLIP's range; LAVIS's Blip2Qformer leaves the temperature unclamped
        ids = batch.image_ids if self.cfg.positives == "image" else batch.sample_ids
        input_ids, mask = pad_to_world_length(batch.input_ids, batch.attention_mask, model.ids.pad)
        image_embeds, image_feats = model.encode_image(batch.pixel_values)  # (B, T, Hv) frozen, (B, Q, D)
        weights, losses = self.cfg.losses, {}
        if "itc" in weights or "itm" in weights:
            text_feat = model.encode_text(input_ids, mask)  # (B, D)
        if "itc" in weights:
            losses["itc_loss"] = self.itc(model, image_feats, text_feat, ids)
        if "itm" in weights:
            with torch.no_grad():
                sim = max_query_similarity(distributed.gather(image_feats), distributed.gather(text_feat)) / model.temp
            losses["itm_loss"] = hard_negative_itm_loss(model, input_ids, mask, image_embeds, sim, ids, progress)
            losses.update(caption_negative_losses(model, batch, image_embeds, self.cfg))
        if "itg" in weights:
            losses["itg_loss"] = caption_loss(model, input_ids, mask, image_embeds, self.cfg.label_smoothing)
        return weighted(losses, loss_weights(self.cfg))

    def itc(self, model, image_feats, text_feat, ids) -> torch.Tensor:
        """In-batch negatives of every rank; gathered with gradient, so DDP equals one process (`distributed`)."""
        image_keys = distributed.gather_with_grad(image_feats)  # (Bw, Q, D)
        text_keys = distributed.gather_with_grad(text_feat)  # (Bw, D)
        targets = smoothed_targets(ids, distributed.gather(ids), self.cfg.label_smoothing)
        return query_itc_loss(image_feats, text_feat, image_keys, text_keys, targets, model.temp)


# --- BLIP-2 stage 2 ----------------------------------------------------------------------------------

class Blip2LMObjective:
    """BLIP-2 stage 2 (`blip2_lm.Blip2LMModel`), the LM's loss on the caption after the soft prompt of projected
    queries; padding and everything given as input are -100.

    Decoder-only LM (LAVIS `blip2_opt.py`): [queries] [BOS] prompt caption, next-token loss on the caption.
    Encoder-decoder LM (LAVIS `blip2_t5.py`): with a caption prompt, the encoder reads [queries] prompt and the
    decoder predicts the caption; without one, a prefix LM as the BLIP-2 paper pre-trains T5: each caption is
    cut at a random token (seeded by the step), the encoder reads [queries] + the first part, the decoder
    predicts the rest."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    def __call__(self, model, batch: Batch, progress: Progress) -> dict[str, torch.Tensor]:
        if model.config.use_decoder_only_language_model:
            input_ids, mask, labels = with_prompt(batch.input_ids, batch.attention_mask, model.prompt)
            input_ids, mask, labels = with_end(input_ids, mask, labels, model.config.text_config.eos_token_id,
                                               model.config.text_config.pad_token_id)
            queries = model.config.num_query_tokens
            logits = model.lm_logits(batch.pixel_values, input_ids, mask)[:, queries:]  # (B, L, V): text positions
            logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1; [BOS] is given
        else:
            input_ids, mask, labels = prefix_split(batch.input_ids, batch.attention_mask, model.prompt,
                                                   model.config.text_config.pad_token_id, progress.seed,
                                                   batch.sample_ids)
            logits = model.seq2seq_logits(batch.pixel_values, input_ids, mask, labels)  # (B, T, V)
        return weighted({"lm_loss": world_token_loss(logits, labels)}, loss_weights(self.cfg))


def world_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, T, V) logits against the (B, T) targets they predict (-100 ignored), summed over this
    rank's tokens and divided by the global token count / world size: the mean over ranks is the global token
    mean, whatever each rank holds."""
    count = distributed.all_reduce_sum((labels != -100).sum()).float() / distributed.current().size
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total / count


def with_end(input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, end: int | None,
             pad: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LM's end token after each caption that does not end with it (OPT's tokenizer appends none; BERT's
    appends [SEP]): a captioner learns where to stop (LAVIS appends "\\n" for OPT)."""
    if end is None:
        return input_ids, mask, labels
    lengths = mask.sum(1)
    rows = torch.arange(len(input_ids), device=input_ids.device)
    missing = input_ids[rows, lengths - 1] != end
    if not missing.any():
        return input_ids, mask, labels
    widen = (0, 1)
    input_ids = F.pad(input_ids, widen, value=pad if pad is not None else end)
    mask, labels = F.pad(mask, widen, value=0), F.pad(labels, widen, value=-100)
    at = lengths[missing]
    input_ids[rows[missing], at], mask[rows[missing], at], labels[rows[missing], at] = end, 1, end
    return input_ids, mask, labels


def prefix_split(input_ids: torch.Tensor, mask: torch.Tensor, prompt: tuple[int, ...], pad: int, seed: int,
                 sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder text and decoder targets of an encoder-decoder LM from (B, L) tokenised captions: with a
    `prompt`, the prompt and the whole caption; without, each caption cut after a random 1..n-1 of its n
    tokens, drawn from (seed, sample id): the same cut however the batch is split across ranks. Returns the
    encoder's (B, Le) ids and mask and the (B, T) targets (-100 on padding)."""
    sources, targets = [], []
    for row, length, sample in zip(input_ids, mask.sum(1).tolist(), sample_ids.tolist(), strict=True):
        tokens = row[:length].tolist()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + sample)
        cut = 0 if prompt or length < 2 else int(torch.randint(1, length, (1,), generator=generator))
        sources.append(list(prompt) + tokens[:cut])
        targets.append(tokens[cut:])
    width = max(1, max(len(s) for s in sources))
    source = torch.full((len(sources), width), pad, dtype=torch.long)
    source_mask = torch.zeros_like(source)
    target = torch.full((len(targets), max(len(t) for t in targets)), -100, dtype=torch.long)
    for i, (s, t) in enumerate(zip(sources, targets, strict=True)):
        source[i, :len(s)], source_mask[i, :len(s)], target[i, :len(t)] = torch.tensor(s, dtype=torch.long), 1, \
            torch.tensor(t, dtype=torch.long)
    return source.to(input_ids.device), source_mask.to(mask.device), target.to(input_ids.device)


class InstructBlipObjective:
    """InstructBLIP (LAVIS `blip2_vicuna_instruct.py`, `blip2_t5_instruct.py`): the Q-Former reads the
    instruction beside its queries; a decoder-only LM reads [queries] [BOS] instruction answer and is trained
    on the answer; an encoder-decoder LM reads [queries] instruction in its encoder and predicts the answer."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    def __call__(self, model, batch: Batch, progress: Progress) -> dict[str, torch.Tensor]:
        instruction = (batch.instruction_ids, batch.instruction_mask)
        answers = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        if model.config.use_decoder_only_language_model:  # the instruction as the LM's tokenizer encodes it (and
            # as InstructBlipProcessor does), then the answer
            input_ids, mask, labels = concat_prompt_answer(batch.prompt_ids, batch.prompt_mask, batch.input_ids,
                                                           batch.attention_mask, model.config.text_config.pad_token_id)
            queries = model.config.num_query_tokens
            logits = model.lm_logits(batch.pixel_values, input_ids, mask, instruction)[:, queries:]
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:
            labels = answers
            logits = model.seq2seq_logits(batch.pixel_values, batch.prompt_ids, batch.prompt_mask, labels, instruction)
        return weighted({"lm_loss": world_token_loss(logits, labels)}, loss_weights(self.cfg))


def concat_prompt_answer(prompt: torch.Tensor, prompt_mask: torch.Tensor, answer: torch.Tensor,
                         answer_mask: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's prompt tokens, then its answer tokens, padding after both (LAVIS `concat_text_input_output`);
    labels are the answer tokens, -100 elsewhere."""
    rows = []
    for p, pm, a, am in zip(prompt, prompt_mask, answer, answer_mask, strict=True):
        head, tail = p[pm.bool()], a[am.bool()]
        rows.append((torch.cat([head, tail]), torch.cat([torch.full_like(head, -100), tail])))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=prompt.dtype, device=prompt.device)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, target) in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)], labels[i, :len(row)] = row, 1, target
    return ids, mask, labels


OBJECTIVES = {"blip": BlipObjective, "blip-2": Blip2Objective, "blip-2-lm": Blip2LMObjective,
              "instructblip": InstructBlipObjective}


def build_objective(family: str, cfg: ObjectiveConfig) -> Objective:
    return OBJECTIVES[family](cfg)
