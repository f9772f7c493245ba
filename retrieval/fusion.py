"""How the two stages' scores combine, as in BLIP/LAVIS evaluation (`compute_sim_matrix`).

final score = ITM class-1 logit + ITC cosine (raw cosine, not divided by the temperature).
"""

from __future__ import annotations

import numpy as np


def match_logit(itm_logits):
    """(N, 2) ITM logits [no match, match] -> (N,) class-1 logit (an array or a tensor, as given)."""
    return itm_logits[:, 1]


def match_probability(itm_logits: np.ndarray) -> np.ndarray:
    """(N, 2) ITM logits -> (N,) float64 probability that text and image match (the 2-way softmax's second)."""
    logits = np.asarray(itm_logits, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))


def fuse(itc, itm_logits):
    """(N,) ITC cosines and (N, 2) float32 ITM logits -> (N,) re-ranked scores (arrays, or tensors, alike)."""
    return match_logit(itm_logits) + itc
