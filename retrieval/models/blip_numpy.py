"""A BLIP retrieval checkpoint's text side in numpy: what a text query needs (ITC text embeddings, ITM re-rank
over stored features), loaded and run without torch.

`load_model` picks it for a text-only load (`with_vision=False`: `blipsearch query TEXT`) that would compute
in fp32 on the CPU anyway, or a one-shot one (`blipsearch query`) on an x86 Linux CPU with bf16 units (see
`device.numpy_text_side`); anything that needs images (indexing, image queries, evaluation) loads the torch
adapter. Its scores equal the torch adapter's in fp32 to rounding (tests/test_blip_text_numpy.py).
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelLoadError
from .base import ImageEncoding, ModelInfo, TextEncoding, TextTokens
from .blip_checkpoint import TEXT_MODULES, WEIGHTS, enc_token_id, model_info
from .blip_text_numpy import NumpyTextTower
from .loading import (
    Checkpoint,
    converted_directory,
    has_safetensors,
    local_directory,
    read_arrays,
    read_config,
    refuse_missing,
    safetensors_keys,
)
from .text_config import TextTowerConfig
from .tokenizer import TextTokenizer


class BlipNumpyTextModel:
    """`RetrievalModel` for text queries: `tokenize`, `encode_texts`, `itm_scores` in numpy float32."""

    device = "cpu"
    dtype = "fp32"

    def __init__(self, text: NumpyTextTower, tokenizer: TextTokenizer, enc_token_id: int, info: ModelInfo):
        self.text = text
        self.tokenizer = tokenizer
        self.enc_token_id = enc_token_id
        self.info = info

    @classmethod
    def load(cls, checkpoint: Checkpoint) -> BlipNumpyTextModel | None:
        """From the checkpoint's safetensors weights, or the copy that an earlier load converted them to; None
        where there are none yet (the torch adapter reads other formats and leaves that copy)."""
        directory = local_directory(checkpoint)
        config = read_config(directory, checkpoint.name)
        info = model_info(checkpoint, directory, config)
        weights_directory = directory if has_safetensors(directory) else converted_directory(info.model_id,
                                                                                             info.revision)
        if not has_safetensors(weights_directory):
            return None
        try:
            present = {key.split(".")[0] for key in safetensors_keys(weights_directory, checkpoint.name)}
            refuse_missing(checkpoint.name, set(WEIGHTS.required) - present, WEIGHTS)
            weights = read_arrays(weights_directory, checkpoint.name, TEXT_MODULES)
        except ModelLoadError:
            if weights_directory == directory:
                raise
            return None  # a damaged converted copy: the torch adapter converts the checkpoint again
        try:
            text = NumpyTextTower(TextTowerConfig.from_blip_config(config), weights)
        except (KeyError, ValueError) as exc:
            raise ModelLoadError(f"model {checkpoint.name} does not fit its config.json: {exc}") from exc
        tokenizer = TextTokenizer.load(directory, checkpoint.name)
        return cls(text, tokenizer, enc_token_id(tokenizer, config), info)

    def tokenize(self, texts: list[str]) -> TextTokens:
        """[CLS] text [SEP], at most 35 tokens, padded to the longest (numpy arrays)."""
        return self.tokenizer.arrays(texts)

    def encode_texts(self, texts: list[str]) -> TextEncoding:
        tokens = self.tokenize(texts)
        return TextEncoding(embeddings=self.text.embed_texts(tokens.input_ids, tokens.attention_mask), tokens=tokens)

    def itm_scores(self, tokens: TextTokens, features: np.ndarray) -> np.ndarray:
        """(N, 2) float32 ITM logits; `[ENC]` at position 0 as BLIP was trained (see blip.py)."""
        input_ids = np.array(tokens.input_ids, dtype=np.int64)  # a copy: the caller's tokens stay [CLS]
        input_ids[:, 0] = self.enc_token_id
        return self.text.itm_logits(input_ids, np.asarray(tokens.attention_mask), np.asarray(features))

    def pixel_values(self, images: list[np.ndarray]) -> np.ndarray:
        raise self._no_vision()

    def encode_images(self, pixel_values) -> ImageEncoding:
        raise self._no_vision()

    @staticmethod
    def _no_vision() -> ModelLoadError:
        return ModelLoadError("this model was loaded without its vision tower; load it with_vision=True")
