"""What the family adapters (blip.py, blip2.py) share: the fields of `RetrievalModel`, pixels and tokens as
the checkpoint's own processor makes them, and the rules of loading their towers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError, ModelLoadError
from .base import ModelInfo, TextEncoding, TextTokens
from .chunks import run_in_chunks
from .int8 import Int8Check, Int8Images
from .preprocessing import normalise
from .tokenizer import TextTokenizer

Output = TypeVar("Output")


class Adapter:
    """Base of the family adapters; each adds `encode_images`, `itm_scores`, `load` and its `text_tower` (the
    module whose `embed_texts(input_ids, attention_mask)` gives normalised ITC text vectors)."""

    text_tower: nn.Module

    def __init__(self, tokenizer: TextTokenizer, info: ModelInfo, device: torch.device, dtype: torch.dtype,
                 vision: nn.Module | None, int8: bool = False):
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        self.dtype = dtype
        self.vision = None if vision is None else vision.to(device=device, dtype=dtype).eval()
        if int8 and (device.type != "cpu" or dtype != torch.float32):
            raise InvalidInputError("--precision int8 runs on the CPU, from fp32 weights")
        self._int8 = Int8Images(self.vision) if int8 and self.vision is not None else None

    @property
    def int8(self) -> bool:
        """The image tower was asked for in int8 (`--precision int8`); `int8_check` says whether it is in use."""
        return self._int8 is not None

    @property
    def int8_check(self) -> Int8Check | None:
        """With `--precision int8`: how the first image batch compared with fp32 (None before one, or without
        int8); see models/int8.py."""
        return None if self._int8 is None else self._int8.check

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

    def _run_vision(self, encode: Callable[[nn.Module, torch.Tensor], Output], pixels: torch.Tensor) -> Output:
        """`encode(vision tower, pixels)` over the batch in chunks (models/chunks.py), with the tower's int8
        twin where the model was loaded with int8 and its first batch passed the check (models/int8.py)."""
        def chunked(compute: Callable[[torch.Tensor], Output], batch: torch.Tensor, one_image: bool = False
                    ) -> Output:  # chunks of 4 images for a CPU batch of 16 (two per thread), or of one
            return run_in_chunks(compute, batch, chunks_per_thread=batch.shape[0] if one_image else 2)

        vision = self._vision_tower()
        if self._int8 is None:
            return chunked(functools.partial(encode, vision), pixels)
        return self._int8.run(encode, pixels, chunked)


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
