"""The two-stage search: ITC recall of candidates, then ITM re-rank over their stored token features.

Hybrid search (on by default where the index holds captions): the query's words also find images by
keyword (BM25 over captions and paths). The ITM re-rank then orders the `candidates` of the vector recall
together with the best keyword hits (a quarter as many again), each with its exact ITC cosine; no vector
candidate is pushed out by keyword noise (words such as "a" or a folder name match many images). Without
the re-rank, the union is ordered by reciprocal-rank fusion (`rrf_scores`) of the two lists.

The searcher knows nothing of folders or storage formats: it receives a `CandidateSource` (the index)
and a `RetrievalModel`, so tests can pass fakes.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import FieldError, InvalidInputError, is_utf8
from .fusion import fuse, match_logit, match_probability
from .models.base import RetrievalModel, TextTokens

RERANK_BATCH = 32  # candidates per ITM forward pass: bounds activation memory
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al. 2009; also Elasticsearch's and LanceDB's default)
KEYWORD_SHARE = 4  # hybrid search adds up to candidates / KEYWORD_SHARE keyword hits to the vector candidates
SORTS = ("score", "date")


@dataclass(frozen=True)
class Filters:
    """Which images a search may return."""

    under: Sequence[str] | None = None  # absolute folders: only images with a file there
    keyword: str | None = None  # only images whose caption or paths hold every word of this
    after: int | None = None  # only files dated at or after this (wall-clock seconds; see indexer/metadata.py)
    before: int | None = None  # ... and before this

    @property
    def empty(self) -> bool:
        return self.under is None and not self.keyword and self.after is None and self.before is None


class CandidateSource(Protocol):
    def recall(self, query: np.ndarray, k: int, where: Filters | None = None) -> list[tuple[str, float]]:
        """Best `k` images (key, ITC cosine) for a (D,) query vector, best first; for (Q, D) query vectors an
        image scores its best cosine against any of them."""
        ...

    def similarity(self, query: np.ndarray, keys: Sequence[str]) -> dict[str, float]:
        """ITC cosine of the query with each of the given images."""
        ...

    def keyword_hits(self, text: str, k: int, where: Filters | None = None) -> list[tuple[str, float]]:
        """Best `k` images (key, keyword score) for the words of `text`, best first."""
        ...

    @property
    def has_captions(self) -> bool: ...

    def token_features(self, keys: Sequence[str]) -> np.ndarray:
        """(K, T, H) ITM features of the given images, in order."""
        ...


@dataclass
class Hit:
    key: str  # image identity in the source (content hash)
    score: float  # ITM class-1 logit + ITC cosine after re-rank, else the ITC cosine (keyword search: BM25)
    itc: float | None  # None: found by keyword alone, without a vector query
    itm_prob: float | None  # ITM match probability; None without re-rank


@dataclass
class SearchOptions:
    top: int = 10
    candidates: int = 64  # ITC recall depth k before the ITM re-rank
    rerank: bool = True
    min_prob: float | None = None  # drop hits whose ITM match probability is lower
    under: Sequence[str] | None = None  # absolute folders: only images with a file there
    keyword: str | None = None  # only images whose caption or paths hold every one of these words
    after: int | None = None  # only files dated at or after this (wall-clock seconds)
    before: int | None = None  # only files dated before this
    hybrid: bool | None = None  # fuse keyword hits of the query's words (None: where the index has captions)
    sort: str = "score"  # or "date": the best `top` results, newest first

    def __post_init__(self) -> None:
        for name in ("top", "candidates"):
            if not _whole(getattr(self, name)) or getattr(self, name) < 1:
                raise FieldError(name, "must be a whole number of at least 1")
        if self.min_prob is not None and not (_number(self.min_prob) and 0 <= self.min_prob <= 1):
            raise FieldError("min_prob", "must lie between 0 and 1")
        if self.under is not None and (not isinstance(self.under, list | tuple) or not all(
                isinstance(f, str) and (os.path.isabs(f) or f.startswith("s3://")) and "\0" not in f
                for f in self.under)):
            raise FieldError("under", "must be a list of absolute folder paths (`api.folders(path)` gives one's)")
        for name in ("after", "before"):
            if getattr(self, name) is not None and not _whole(getattr(self, name)):
                raise FieldError(name, "must be a time in whole seconds (`dates.date_range` reads dates)")
        if self.min_prob is not None and not self.rerank:
            raise FieldError("min_prob", "needs the ITM re-rank, which is turned off")
        if self.sort not in SORTS:
            raise FieldError("sort", f"must be one of {', '.join(SORTS)}")
        for name in ("rerank", "hybrid"):  # "no" is truthy: a re-rank asked off ran
            if not isinstance(getattr(self, name), bool) and not (name == "hybrid" and self.hybrid is None):
                raise FieldError(name, f"must be True or False, not {getattr(self, name)!r}")
        if self.keyword is not None and not isinstance(self.keyword, str):
            raise FieldError("keyword", f"must be a text, not {type(self.keyword).__name__}")
        if self.keyword is not None and not self.keyword.strip():
            raise FieldError("keyword", "is empty")
        if self.keyword is not None and not is_utf8(self.keyword):  # argv bytes of another encoding: dropped unsaid
            raise FieldError("keyword", "is not valid UTF-8: type it again in a terminal set to UTF-8 "
                                        "(e.g. LANG=C.UTF-8)")
        if self.after is not None and self.before is not None and self.after >= self.before:
            raise FieldError("before", "must be later than after")

    @property
    def filters(self) -> Filters:
        return Filters(self.under, self.keyword, self.after, self.before)


def _whole(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def rrf_scores(*rankings: Sequence[str], k: int = RRF_K) -> dict[str, float]:
    """Reciprocal-rank fusion: each key's sum over rankings of 1 / (k + rank), rank from 1, best first; ties
    keep the order of first appearance (the first ranking leads)."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, 1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    return dict(sorted(scores.items(), key=lambda item: -item[1]))



def blank(text: str) -> bool:
    """No character but spaces, controls and invisible formatting ones (a zero-width space): nothing to match."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


class Searcher:
    def __init__(self, model: RetrievalModel | None, source: CandidateSource):  # None: keyword searches alone
        self.model = model
        self.source = source

    def search_text(self, text: str, options: SearchOptions) -> list[Hit]:
        if blank(text):
            raise InvalidInputError("the query text is empty")
        encoded = self.model.encode_texts([text])
        return self.search_vector(np.asarray(encoded.embeddings[0]), [(1.0, encoded.tokens)], options, words=text)

    def search_keywords(self, options: SearchOptions) -> list[Hit]:
        """Images by their `options.keyword` words alone (no vector): best BM25 first."""
        if not options.keyword:
            raise InvalidInputError("a keyword search needs words")
        found = self.source.keyword_hits(options.keyword, options.top, options.filters)
        return [Hit(key, score, None, None) for key, score in found]

    def search_vector(self, query: np.ndarray, texts: Sequence[tuple[float, TextTokens]],
                      options: SearchOptions, words: str | None = None) -> list[Hit]:
        """Recall by a (D,) or (V, D) query (fused with the keyword hits of `words` in hybrid search);
        re-rank by ITC + the weighted ITM match logits of `texts` (a negative weight subtracts that text's
        logit). Without texts, or without re-rank, the recall order stands."""
        # --top beyond --candidates re-ranks more: the user asked for that many results
        depth = max(options.candidates, options.top)
        where = options.filters
        recalled = self.source.recall(query, depth, where)
        fused = None  # hybrid search: each candidate's reciprocal-rank score
        if words and (options.hybrid if options.hybrid is not None else self.source.has_captions):
            keyword = self.source.keyword_hits(words, max(1, depth // KEYWORD_SHARE), where)
            recalled, fused = self._with_keyword_hits(query, recalled, keyword)
        if not options.rerank or not texts:
            return [Hit(key, itc if fused is None else fused[key], itc, None) for key, itc in recalled[:options.top]]
        hits = self.rerank(texts, recalled)
        if options.min_prob is not None:
            hits = [h for h in hits if h.itm_prob >= options.min_prob]
        return hits[:options.top]

    def _with_keyword_hits(self, query: np.ndarray, recalled: list[tuple[str, float]],
                           keyword: list[tuple[str, float]]) -> tuple[list[tuple[str, float]], dict[str, float]]:
        """The vector candidates and the keyword hits, each with its ITC cosine, in reciprocal-rank-fused
        order; and each one's fused score."""
        scores = rrf_scores([key for key, _ in recalled], [key for key, _ in keyword])
        itc = dict(recalled)
        missing = [key for key, _ in keyword if key not in itc]
        if missing:
            itc.update(self.source.similarity(query, missing))
        return [(key, itc[key]) for key in scores], scores

    def rerank(self, texts: Sequence[tuple[float, TextTokens]], recalled: list[tuple[str, float]]) -> list[Hit]:
        """ITM of each (weight, text) over the stored features of the recalled images; best fused score first.

        score = ITC + sum of weight x ITM match logit (one text of weight 1: BLIP's logit + cosine); the match
        probability reported is the first text's.
        """
        hits = []
        for start in range(0, len(recalled), RERANK_BATCH):
            chunk = recalled[start:start + RERANK_BATCH]
            features = self.source.token_features([key for key, _ in chunk])  # (K, T, H) float32
            logits = [np.asarray(self.model.itm_scores(tokens, features), dtype=np.float32)  # each (K, 2)
                      for _, tokens in texts]
            scores = fuse(np.array([score for _, score in chunk], dtype=np.float32), logits[0] * texts[0][0])
            for (weight, _), more in zip(texts[1:], logits[1:], strict=True):
                scores += weight * match_logit(more)
            probs = match_probability(logits[0])
            hits += [Hit(key, float(s), c, float(p)) for (key, c), s, p in zip(chunk, scores, probs, strict=True)]
        return sorted(hits, key=lambda h: -h.score)
