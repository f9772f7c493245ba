"""Shared check of a reduced-precision model against its fp32 twin, on the score the search ranks by."""

from __future__ import annotations

import torch

from blipsearch.retrieval.fusion import fuse


def fused_scores(model, pixels: torch.Tensor, text: str, stored=None) -> torch.Tensor:
    """ITC (max over each image's vectors: BLIP has 1, BLIP-2 32) fused with ITM, one text against B images: (B,).
    `stored(features)`: what ITM reads instead of the encoder's features (a round trip through the store)."""
    images, encoded = model.encode_images(pixels), model.encode_texts([text])
    itc = (images.embeddings @ encoded.embeddings[0]).amax(dim=1)  # (B, V) -> (B,)
    features = images.features if stored is None else stored(images.features)
    return fuse(itc, model.itm_scores(encoded.tokens, features))


def assert_within_tolerance_and_same_ranking(fp32_model, low_model, text: str, tolerance: float,
                                             min_apart: int = 1, images: int = 16) -> None:
    """Every fused score within `tolerance` of fp32, and every pair of images that fp32 puts more than
    2 x tolerance apart (at least `min_apart` of them: the check has teeth) keeps its order."""
    side = fp32_model.info.preprocessing.height
    pixels = torch.randn(images, 3, side, side, generator=torch.Generator().manual_seed(3))
    fp32, low = fused_scores(fp32_model, pixels, text), fused_scores(low_model, pixels, text)
    assert (fp32 - low).abs().max() < tolerance
    apart = (fp32[:, None] - fp32[None, :]) > 2 * tolerance  # pairs the tolerance cannot swap
    assert apart.sum() >= min_apart and ((low[:, None] - low[None, :]) > 0)[apart].all()
