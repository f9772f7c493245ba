"""Ranks and recall@k from score matrices, as LAVIS `report_metrics` counts them, with ties defined.

A query's rank is the 0-based position of its best relevant item: image->text, any of the image's
captions; text->image, the caption's own image. Hit@k iff rank < k.

Ordering of items for one query, highest first, by the key (tier, score):
- `tier` lets the re-ranked ordering put every ITM candidate (tier 1) above every non-candidate (tier 0)
  whatever the fused score, even when ITM logit + ITC is below -100 (LAVIS's filler) or -inf.
- Ties count against the query: a wrong item whose key equals the best relevant item's key ranks ahead of
  it. The ranking does not depend on the order of images or captions in the file, and a model that gives
  everything the same score gets recall 0, not recall by file order. NaN scores rank like -inf. (Which
  items become ITM candidates is `evaluation.top_candidates`'s choice: of items tied at the k_test-th
  ITC score, the earlier in the file, as LAVIS's `topk`. Repeated captions are encoded once, so they tie
  exactly.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

KS = (1, 5, 10)
_CHUNK_ELEMENTS = 1 << 24  # rows of (Q, P) handled at once: bounds temporaries to ~100 MB


@dataclass(frozen=True)
class Recall:
    """Recall@1/5/10 in percent for both directions, named as LAVIS names them."""

    txt_r1: float  # image->text (TR@1)
    txt_r5: float
    txt_r10: float
    img_r1: float  # text->image (IR@1)
    img_r5: float
    img_r10: float

    @property
    def txt_r_mean(self) -> float:
        return (self.txt_r1 + self.txt_r5 + self.txt_r10) / 3

    @property
    def img_r_mean(self) -> float:
        return (self.img_r1 + self.img_r5 + self.img_r10) / 3

    @property
    def r_mean(self) -> float:
        return (self.txt_r_mean + self.img_r_mean) / 2

    def to_dict(self) -> dict[str, float]:
        names = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean",
                 "r_mean")
        return {name: float(getattr(self, name)) for name in names}


def ranks(scores: torch.Tensor, query_groups: torch.Tensor, item_groups: torch.Tensor,
          tier: torch.Tensor | None = None) -> torch.Tensor:
    """(Q, P) scores -> (Q,) rank of each query's best relevant item (P where it has none).

    Item p is relevant to query q iff `query_groups[q] == item_groups[p]`: for image->text pass
    (image index per image, image index per caption); for text->image the reverse.
    """
    if scores.ndim != 2 or scores.shape != (len(query_groups), len(item_groups)):
        raise ValueError(f"scores {tuple(scores.shape)} do not match {len(query_groups)} queries x "
                         f"{len(item_groups)} items")
    return torch.cat([_chunk_ranks(scores[b], query_groups[b], item_groups, None if tier is None else tier[b])
                      for b in row_blocks(*scores.shape)])


def row_blocks(rows: int, columns: int, budget: int | None = None) -> Iterator[slice]:
    """Slices of consecutive rows holding about `budget` elements each (at least one row)."""
    step = max(1, (budget or _CHUNK_ELEMENTS) // max(1, columns))
    for start in range(0, rows, step):
        yield slice(start, start + step)


def _chunk_ranks(scores: torch.Tensor, query_groups: torch.Tensor, item_groups: torch.Tensor,
                 tier: torch.Tensor | None) -> torch.Tensor:
    scores = scores.float().nan_to_num(nan=float("-inf"))
    tier = torch.zeros_like(scores, dtype=torch.int8) if tier is None else tier.to(torch.int8)
    relevant = query_groups[:, None] == item_groups[None, :]  # (c, P)
    best_tier = torch.where(relevant, tier, -1).amax(dim=1, keepdim=True)  # (c, 1)
    in_best = relevant & (tier == best_tier)
    best_score = torch.where(in_best, scores, float("-inf")).amax(dim=1, keepdim=True)  # (c, 1)
    ahead = (tier > best_tier) | ((tier == best_tier) & (scores >= best_score))
    ahead &= ~relevant
    ahead |= best_tier < 0  # no relevant item at all: everything is ahead
    return ahead.sum(dim=1)


def recall_at(query_ranks: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> float:
    """Percent of (valid) queries whose rank is below k."""
    hits = query_ranks < k
    if valid is not None:
        hits = hits[valid]
    return 100.0 * hits.double().mean().item() if hits.numel() else float("nan")


def recall(i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor, i2t_valid: torch.Tensor | None = None) -> Recall:
    """Recall@1/5/10 from both directions' ranks; `i2t_valid` drops images that have no caption."""
    tr = [recall_at(i2t_ranks, k, i2t_valid) for k in KS]
    ir = [recall_at(t2i_ranks, k) for k in KS]
    return Recall(*tr, *ir)
