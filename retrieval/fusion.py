"""How the two stages' scores combine, as in BLIP/LAVIS evaluation (`compute_sim_matrix`).

final score = ITM class-1 logit + ITC cosine (raw cosine, not divided by the temperature).
"""

from __future__ import annotations

import torch


def match_logit(itm_logits: torch.Tensor) -> torch.Tensor:
    """(N, 2) ITM logits [no match, match] -> (N,) class-1 logit."""
    return itm_logits[:, 1]


def match_probability(itm_logits: torch.Tensor) -> torch.Tensor:
    """(N, 2) ITM logits -> (N,) probability that text and image match."""
    return itm_logits.float().softmax(dim=-1)[:, 1]


def fuse(itc: torch.Tensor, itm_logits: torch.Tensor) -> torch.Tensor:
    """(N,) ITC cosines and (N, 2) ITM logits -> (N,) re-ranked scores."""
    return match_logit(itm_logits).float() + itc.float()
