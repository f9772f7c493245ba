"""What the family adapters (blip.py, blip2.py) share: the fields of `RetrievalModel`, pixels and tokens as
the checkpoint's own processor makes them, and the rules of loading their towers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..errors import ModelLoadError
from .base import ModelInfo, TextEncoding, TextTokens
from .preprocessing import normalise
from .tokenizer import TextTokenizer


class Adapter:
    """Base of the family adapters; each adds `encode_images`, `itm_scores`, `load` and its `text_tower` (the
    module whose `embed_texts(input_ids, attention_mask)` gives normalised ITC text vectors)."""

    text_tower: nn.Module

    def __init__(self, tokenizer: TextTokenizer, info: ModelInfo, device: torch.device, dtype: torch.dtype,
                 vision: nn.Module | None):
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        self.dtype = dtype
        self.vision = None if vision is None else vision.to(device=device, dtype=dtype).eval()

    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        """(B, 3, H, W) float32 from uint8 (H, W, 3) arrays already resized: rescale and normalise."""
        pre = self.info.preprocessing
        return normalise(torch.from_numpy(np.stack(images)), pre.mean, pre.std)

    def tokenize(self, texts: list[str]) -> TextTokens:
        """[CLS] text [SEP], at most 35 tokens, padded to the longest."""
        return self.tokenizer(texts)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> TextEncoding:
        tokens = self.tokenize(texts)
        embeddings = self.text_tower.embed_texts(tokens.input_ids.to(self.device),  # (N, D)
                                                 tokens.attention_mask.to(self.device))
        return TextEncoding(embeddings=embeddings.cpu(), tokens=tokens)

    def _vision_tower(self) -> nn.Module:
        if self.vision is None:
            raise ModelLoadError("this model was loaded without its vision tower; load it with_vision=True")
        return self.vision


def paired(tokens: TextTokens, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with one text per image row: a single text (N=1) repeats for `rows`
    images (a view, no copy); N texts stay as they are."""
    input_ids, attention_mask = tokens.input_ids, tokens.attention_mask
    if input_ids.shape[0] == 1 and rows > 1:
        return input_ids.expand(rows, -1), attention_mask.expand(rows, -1)
    return input_ids, attention_mask


@contextmanager
def fitting_config(name: str) -> Iterator[None]:
    """Building towers from config.json and filling them with tensors: a size mismatch is one line."""
    try:
        yield
    except (KeyError, RuntimeError, ValueError) as exc:  # sizes in config.json and tensors disagree
        raise ModelLoadError(f"model {name} does not fit its config.json: {exc}") from exc
