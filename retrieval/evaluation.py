"""Image-text retrieval evaluation with the protocol of LAVIS `compute_sim_matrix` / BLIP `evaluation`.

1. ITC similarity of every image with every caption (max over an image's vectors, for BLIP-2's queries).
2. Per image the top `k_test` captions, per caption the top `k_test` images, by ITC (ties: lower index).
3. ITM re-rank of those candidates in both directions: score = ITM class-1 logit + ITC cosine
   (`fusion.fuse`); every non-candidate ranks below every candidate, in ITC order.
4. Recall@1/5/10 both ways, ITC-only and re-ranked (`eval_metrics`).

Memory stays bounded at full size: image features live in a float16 memmap (`eval_cache`), ITM reads one
image's features at a time, and (Q, P) score matrices are ranked a block of rows at a time.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .annotations import AnnotatedImage
from .errors import InvalidInputError, is_utf8, printable
from .eval_cache import FeatureCache, fill_cache, image_manifest, open_cache
from .eval_metrics import Recall, ranks, recall, row_blocks
from .fusion import fuse
from .models import RetrievalModel, TextTokens

log = logging.getLogger(__name__)

# LAVIS defaults: BLIP retrieval configs (k_test 256 COCO, 128 Flickr); BLIP-2 uses 128 on both.
_K_TEST = {("blip", "coco"): 256, ("blip", "flickr30k"): 128}
FALLBACK_K_TEST = 128  # BLIP-2, and any dataset of one's own
_ITC_CHUNK_ELEMENTS = 1 << 26  # (images x captions x vectors) per similarity chunk: ~256 MB of fp32


def default_k_test(family: str, dataset: str) -> int:
    return _K_TEST.get((family, dataset), FALLBACK_K_TEST)


@dataclass
class EvalOptions:
    k_test: int  # ITM candidates per query (capped at the pool size)
    image_batch: int = 32  # images per vision-tower forward
    text_batch: int = 256  # captions per text-encoder forward
    itm_batch: int = 128  # image-text pairs per ITM forward
    workers: int = 4  # image-decoding threads
    progress: bool = True  # tqdm bars on stderr, one per stage


@dataclass
class EvalResult:
    images: int
    texts: int
    k_test: int
    itc: Recall  # ranked by ITC cosine alone
    rerank: Recall  # ITM logit + ITC over the k_test candidates
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time
    images_encoded: int = 0  # images run through the vision tower (the rest came from the cache)
    itm_pairs: int = 0  # distinct image-text pairs scored by ITM
    candidate_pairs: int = 0  # image->text plus text->image candidates (LAVIS scores this many)

    @property
    def itm_pairs_per_second(self) -> float:
        itm = self.seconds.get("itm", 0.0)
        return self.itm_pairs / itm if itm > 0 else float("nan")


@dataclass
class TextSet:
    embeddings: torch.Tensor  # (N, D) float32
    tokens: TextTokens  # (N, L), padded to the longest caption
    image_of: torch.Tensor  # (N,) int64 index of each caption's image


def evaluate(model: RetrievalModel, dataset: list[AnnotatedImage], root: Path, options: EvalOptions,
             cache_dir: Path | None = None, limit: int | None = None) -> EvalResult:
    """Run the protocol over the first `limit` images of `dataset` (all by default), found under `root`.

    Image features go to `cache_dir` (kept, resumable) or to a temporary directory.
    """
    subset = dataset[:limit]
    paths = [item.image for item in subset]
    check_images(root, paths)
    check_captions(subset)
    timer = _Timer()
    with _cache_root(cache_dir) as directory:
        cache = open_cache(directory, image_manifest(model, root, [item.image for item in dataset]))
        with timer("image_encoding"):
            encoded = fill_cache(model, cache, root, paths, options.image_batch, options.workers,
                                 options.progress)
            image_embeddings = torch.from_numpy(np.array(cache.embeddings[:len(paths)]))  # (I, V, D)
        with timer("text_encoding"):
            texts = encode_captions(model, subset, options.text_batch, options.progress)
        with timer("itc"):
            itc = itc_similarity(image_embeddings, texts.embeddings)  # (I, N)
            i2t = top_candidates(itc, options.k_test)  # (I, k)
            t2i = top_candidates(itc.T, options.k_test)  # (N, k)
        with timer("itm"):
            i2t_fused, t2i_fused = rerank(model, cache, texts.tokens, itc, i2t, t2i, options.itm_batch,
                                          options.progress)
    images = torch.arange(len(paths))
    has_caption = torch.bincount(texts.image_of, minlength=len(paths)) > 0
    itc_recall = recall(ranks(itc, images, texts.image_of), ranks(itc.T, texts.image_of, images), has_caption)
    rerank_recall = recall(reranked_ranks(itc, i2t, i2t_fused, images, texts.image_of),
                           reranked_ranks(itc.T, t2i, t2i_fused, texts.image_of, images), has_caption)
    return EvalResult(images=len(paths), texts=len(texts.image_of), k_test=options.k_test, itc=itc_recall,
                      rerank=rerank_recall, seconds=timer.seconds, images_encoded=encoded,
                      itm_pairs=len(torch.unique(pair_keys(i2t, t2i))), candidate_pairs=i2t.numel() + t2i.numel())


def check_images(root: Path, paths: list[str]) -> None:
    """Fail before loading a model when annotated images are missing under `root`."""
    missing = [p for p in paths if not (root / p).is_file()]
    if missing:
        raise InvalidInputError(f"{len(missing)} of {len(paths)} annotated images are missing under {root}, "
                                f"e.g. {missing[0]}; --images is the folder the annotation paths start in")


def check_captions(dataset: list[AnnotatedImage]) -> None:
    """Fail before loading a model when an image has no caption (it would silently leave the image->text
    recall's count) or one that cleaning empties (a query of nothing)."""
    for item in dataset:
        bad = next((c for c in item.captions if not is_utf8(c)), None)
        if bad is not None:  # a lone surrogate (JSON's "\ud800"): refused by the tokenizer as a "query text"
            raise InvalidInputError(f"annotated image {printable(item.image)} has a caption that is not valid "
                                    f"UTF-8 text ({printable(bad)!r}); mend it in the annotation file")
        if not item.captions or not all(pre_caption(c) for c in item.captions):
            raise InvalidInputError(f"annotated image {printable(item.image)} has no caption, or one that is "
                                    "empty once cleaned (BLIP's pre_caption); give each image captions with "
                                    "words, or remove it from the annotation file")


def encode_captions(model: RetrievalModel, dataset: list[AnnotatedImage], batch_size: int,
                    progress: bool = True) -> TextSet:
    """ITC embeddings and ITM tokens of every caption, in annotation order. Each distinct caption (after
    cleaning) is encoded once: repeated captions (COCO has them) get the very same embedding, where a
    batch's row order once moved their last bits, and with them which of two equal captions ranked first."""
    cleaned = [pre_caption(c) for item in dataset for c in item.captions]
    if not cleaned:
        raise InvalidInputError("the annotation file has no captions for these images")
    image_of = torch.tensor([i for i, item in enumerate(dataset) for _ in item.captions], dtype=torch.long)
    captions = list(dict.fromkeys(cleaned))  # distinct, in first-seen order
    row = {caption: i for i, caption in enumerate(captions)}
    of = torch.tensor([row[c] for c in cleaned], dtype=torch.long)  # each caption's distinct row
    embeddings, ids, masks = [], [], []
    with tqdm(total=len(captions), desc="text encoding", unit="caption", disable=not progress) as bar:
        for start in range(0, len(captions), batch_size):
            encoding = model.encode_texts(captions[start:start + batch_size])
            embeddings.append(encoding.embeddings.float().cpu())
            ids.append(encoding.tokens.input_ids.cpu())
            masks.append(encoding.tokens.attention_mask.cpu())
            bar.update(len(ids[-1]))
    length = max(t.shape[1] for t in ids)
    tokens = TextTokens(input_ids=torch.cat([_pad(t, length) for t in ids])[of],
                        attention_mask=torch.cat([_pad(m, length) for m in masks])[of])
    return TextSet(torch.cat(embeddings)[of], tokens, image_of)


def pre_caption(caption: str, max_words: int = 30) -> str:
    """BLIP's caption cleaning for evaluation (`pre_caption` in salesforce/BLIP data/utils.py, LAVIS's
    BlipCaptionProcessor): lower case, the punctuation .!"()*#:;~ to spaces, single spaces, max_words words."""
    caption = re.sub(r"\s{2,}", " ", re.sub(r"([.!\"()*#:;~])", " ", caption.lower())).strip()
    return " ".join(caption.split(" ")[:max_words])


def _pad(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad (N, L) with zeros (masked out) to (N, length); a masked position changes no output."""
    return torch.nn.functional.pad(tokens, (0, length - tokens.shape[1]))


def itc_similarity(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """(I, V, D) and (N, D) unit vectors -> (I, N) cosine, the max over each image's V vectors."""
    count, vectors, _ = image_embeddings.shape
    text = text_embeddings.float()
    blocks = row_blocks(count, vectors * len(text), _ITC_CHUNK_ELEMENTS)
    return torch.cat([torch.einsum("ivd,nd->inv", image_embeddings[b].float(), text).amax(dim=-1)
                      for b in blocks])


def top_candidates(sim: torch.Tensor, k: int) -> torch.Tensor:
    """(Q, P) -> (Q, min(k, P)) item indices, best first; equal scores keep the lower index first."""
    k = min(k, sim.shape[1])
    return torch.cat([torch.sort(sim[b], dim=1, descending=True, stable=True).indices[:, :k]
                      for b in row_blocks(*sim.shape)])


def rerank(model: RetrievalModel, cache: FeatureCache, tokens: TextTokens, itc: torch.Tensor,
           i2t: torch.Tensor, t2i: torch.Tensor, batch_size: int,
           progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ITM + ITC scores of the candidates: (I, k) image->text and (N, k) text->image.

    LAVIS scores each direction's candidates separately; a pair is the same ITM input either way, so each
    distinct pair is scored once here and its score goes to both directions.
    """
    images, texts = itc.shape
    keys, inverse = torch.unique(pair_keys(i2t, t2i), return_inverse=True)  # sorted: pairs grouped by image
    with tqdm(total=len(keys), desc="ITM re-rank", unit="pair", disable=not progress) as bar:
        fused = pair_scores(model, cache, tokens, itc, keys // texts, keys % texts, batch_size, bar)[inverse]
    return fused[:i2t.numel()].view(images, -1), fused[i2t.numel():].view(texts, -1)


def pair_keys(i2t: torch.Tensor, t2i: torch.Tensor) -> torch.Tensor:
    """Key image * N + text of every candidate pair: the (I, k) image->text ones, then the (N, k) others."""
    texts = len(t2i)
    return torch.cat([(torch.arange(len(i2t))[:, None] * texts + i2t).reshape(-1),
                      (t2i * texts + torch.arange(texts)[:, None]).reshape(-1)])


def pair_scores(model: RetrievalModel, cache: FeatureCache, tokens: TextTokens, itc: torch.Tensor,
                image_rows: torch.Tensor, text_rows: torch.Tensor, batch_size: int,
                bar: tqdm | None = None) -> torch.Tensor:
    """(P,) ITM class-1 logit + ITC of pairs (image_rows[p], text_rows[p]), pairs of one image adjacent.

    Each run of pairs with the same image reads that image's features from the cache once and goes through
    ITM `batch_size` texts at a time (one image against many texts is one large matmul in the ITM pass).
    """
    out = torch.empty(len(image_rows))
    images, counts = torch.unique_consecutive(image_rows, return_counts=True)
    start = 0
    for image, count in zip(images.tolist(), counts.tolist(), strict=True):
        features = torch.from_numpy(np.array(cache.features[image]))[None]  # (1, T, H) float16
        for lo in range(start, start + count, batch_size):
            hi = min(lo + batch_size, start + count)
            texts = text_rows[lo:hi]
            logits = model.itm_scores(_select(tokens, texts), features)  # (b, 2)
            out[lo:hi] = fuse(itc[image, texts], logits)
            if bar is not None:
                bar.update(hi - lo)
        start += count
    return out


def _select(tokens: TextTokens, rows: torch.Tensor) -> TextTokens:
    """The tokens of `rows`, trimmed to their longest caption (padding beyond it is masked anyway)."""
    mask = tokens.attention_mask[rows]
    length = int(mask.sum(dim=1).max())
    return TextTokens(input_ids=tokens.input_ids[rows, :length], attention_mask=mask[:, :length])


def candidate_scores(itc: torch.Tensor, candidates: torch.Tensor,
                     fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-ranked (Q, P) scores and tiers: fused score and tier 1 for candidates, ITC and tier 0 elsewhere."""
    scores = itc.clone().scatter_(1, candidates, fused)
    tier = torch.zeros(itc.shape, dtype=torch.int8).scatter_(1, candidates, 1)
    return scores, tier


def reranked_ranks(itc: torch.Tensor, candidates: torch.Tensor, fused: torch.Tensor,
                   query_groups: torch.Tensor, item_groups: torch.Tensor) -> torch.Tensor:
    """(Q,) ranks after re-ranking, built a block of queries at a time to keep (Q, P) copies small."""
    out = []
    for b in row_blocks(*itc.shape):
        scores, tier = candidate_scores(itc[b], candidates[b], fused[b])
        out.append(ranks(scores, query_groups[b], item_groups, tier))
    return torch.cat(out)


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


@contextmanager
def _cache_root(cache_dir: Path | None) -> Iterator[Path]:
    """The user's cache directory, or a temporary one removed afterwards."""
    if cache_dir is not None:
        yield Path(cache_dir)
        return
    with tempfile.TemporaryDirectory(prefix="blipsearch-eval-") as tmp:
        log.info("no --cache: image features go to %s for this run only", tmp)
        yield Path(tmp)
