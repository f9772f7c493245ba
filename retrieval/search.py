"""The two-stage search: ITC recall of candidates, then ITM re-rank over their stored token features.

The searcher knows nothing of folders or storage formats: it receives a `CandidateSource` (the index)
and a `RetrievalModel`, so tests can pass fakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .errors import FieldError, InvalidInputError
from .fusion import fuse, match_logit, match_probability
from .models.base import RetrievalModel, TextTokens

RERANK_BATCH = 32  # candidates per ITM forward pass: bounds activation memory


class CandidateSource(Protocol):
    def recall(self, query: np.ndarray, k: int, under: Sequence[str] | None = None) -> list[tuple[str, float]]:
        """Best `k` images (key, ITC cosine) for a (D,) query vector, best first; for (Q, D) query vectors an
        image scores its best cosine against any of them."""
        ...

    def token_features(self, keys: Sequence[str]) -> np.ndarray:
        """(K, T, H) ITM features of the given images, in order."""
        ...


@dataclass
class Hit:
    key: str  # image identity in the source (content hash)
    score: float  # ITM class-1 logit + ITC cosine after re-rank, else the ITC cosine
    itc: float
    itm_prob: float | None  # ITM match probability; None without re-rank


@dataclass
class SearchOptions:
    top: int = 10
    candidates: int = 64  # ITC recall depth k before the ITM re-rank
    rerank: bool = True
    min_prob: float | None = None  # drop hits whose ITM match probability is lower
    under: Sequence[str] | None = None  # absolute folders: only images with a file there

    def __post_init__(self) -> None:
        for name in ("top", "candidates"):
            if getattr(self, name) < 1:
                raise FieldError(name, "must be at least 1")
        if self.min_prob is not None and not 0 <= self.min_prob <= 1:
            raise FieldError("min_prob", "must lie between 0 and 1")
        if self.min_prob is not None and not self.rerank:
            raise FieldError("min_prob", "needs the ITM re-rank, which is turned off")


class Searcher:
    def __init__(self, model: RetrievalModel, source: CandidateSource):
        self.model = model
        self.source = source

    def search_text(self, text: str, options: SearchOptions) -> list[Hit]:
        if not text.strip():
            raise InvalidInputError("the query text is empty")
        encoded = self.model.encode_texts([text])
        return self.search_vector(encoded.embeddings[0].numpy(), [(1.0, encoded.tokens)], options)

    def search_vector(self, query: np.ndarray, texts: Sequence[tuple[float, TextTokens]],
                      options: SearchOptions) -> list[Hit]:
        """Recall by a (D,) or (V, D) query; re-rank by ITC + the weighted ITM match logits of `texts` (a negative
        weight subtracts that text's logit). Without texts, or without re-rank, the ITC order stands."""
        # --top beyond --candidates re-ranks more: the user asked for that many results
        recalled = self.source.recall(query, max(options.candidates, options.top), options.under)
        if not options.rerank or not texts:
            return [Hit(key, itc, itc, None) for key, itc in recalled[:options.top]]
        hits = self.rerank(texts, recalled)
        if options.min_prob is not None:
            hits = [h for h in hits if h.itm_prob >= options.min_prob]
        return hits[:options.top]

    def search_image(self, pixels: torch.Tensor, options: SearchOptions) -> list[Hit]:
        """Images like a (1, 3, H, W) query image: the best ITC cosine between any of its V vectors and any of
        an indexed image's (BLIP: its one vector; BLIP-2: 32 query vectors each, so an image scores 1 with
        itself)."""
        vectors = self.model.encode_images(pixels).embeddings[0]  # (V, D)
        return self.search_vector(vectors.numpy(), [], options)

    def rerank(self, texts: Sequence[tuple[float, TextTokens]], recalled: list[tuple[str, float]]) -> list[Hit]:
        """ITM of each (weight, text) over the stored features of the recalled images; best fused score first.

        score = ITC + sum of weight x ITM match logit (one text of weight 1: BLIP's logit + cosine); the match
        probability reported is the first text's.
        """
        hits = []
        for start in range(0, len(recalled), RERANK_BATCH):
            chunk = recalled[start:start + RERANK_BATCH]
            features = torch.from_numpy(self.source.token_features([key for key, _ in chunk]))
            logits = [self.model.itm_scores(tokens, features) for _, tokens in texts]  # each (K, 2)
            scores = fuse(torch.tensor([score for _, score in chunk]), logits[0] * texts[0][0])
            for (weight, _), more in zip(texts[1:], logits[1:], strict=True):
                scores += weight * match_logit(more).float()
            probs = match_probability(logits[0])
            hits += [Hit(key, float(s), c, float(p)) for (key, c), s, p in zip(chunk, scores, probs, strict=True)]
        return sorted(hits, key=lambda h: -h.score)
