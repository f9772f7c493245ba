"""BLIP (ViT + BERT) retrieval checkpoints, as transformers' `BlipForImageTextRetrieval` stores them.

The engine runs the parts itself, so that stored vision features are reused (the class's own `forward`
re-runs the vision tower for every pair): `BlipVisionTower` (blip_vision.py) for images and
`BlipTextTower` (blip_text.py, with folded cross-attention) for texts and ITM. Both hold the
checkpoint's own tensors under transformers' names and are tested equal to transformers' classes.
Safetensors checkpoints load without importing transformers (a text query reads only the text side);
other weight formats are read through `BlipForImageTextRetrieval.from_pretrained`.

ITM convention: BLIP was trained with an `[ENC]` token replacing `[CLS]` at position 0 of the text that
attends to the image (salesforce/BLIP `blip_retrieval.py`, LAVIS `compute_sim_matrix`). transformers'
`forward` feeds `[CLS]` (transformers issues #22732, #25629). We follow training: `itm_scores` writes
`enc_token_id` at position 0; see `blip_checkpoint.enc_token_id`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .adapter import Adapter, fitting_config, paired
from .base import ImageEncoding, ModelInfo, TextTokens
from .blip_checkpoint import TEXT_MODULES, VISION_MODULES, WEIGHTS, enc_token_id, model_info
from .blip_text import BlipTextTower, TextTowerConfig
from .blip_vision import BlipVisionTower, VisionTowerConfig
from .chunks import run_in_chunks
from .loading import Checkpoint, local_directory, read_config, read_state
from .tokenizer import TextTokenizer

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


class BlipRetrievalModel(Adapter):
    """A BLIP retrieval checkpoint on one device and dtype; implements `RetrievalModel`."""

    def __init__(self, text: BlipTextTower, tokenizer: TextTokenizer, enc_token_id: int, info: ModelInfo,
                 device: torch.device, dtype: torch.dtype, vision: BlipVisionTower | None = None,
                 int8: bool = False):
        super().__init__(tokenizer, info, device, dtype, vision, int8)
        self.text = self.text_tower = text.to(device=device, dtype=dtype).eval()
        self.enc_token_id = enc_token_id

    @classmethod
    def load(cls, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype,
             with_vision: bool = True, int8: bool = False) -> BlipRetrievalModel:
        directory = local_directory(checkpoint)
        config = read_config(directory, checkpoint.name)
        info = model_info(checkpoint, directory, config)
        modules = TEXT_MODULES + (VISION_MODULES if with_vision else ())
        state = read_state(checkpoint.name, directory, info, modules, WEIGHTS, dict.fromkeys(modules, dtype))
        with fitting_config(checkpoint.name):
            text = BlipTextTower(TextTowerConfig.from_blip_config(config))
            vision = BlipVisionTower(VisionTowerConfig.from_blip_config(config)) if with_vision else None
            text.load_weights(state)
            if vision is not None:
                vision.load_weights(state)
        tokenizer = TextTokenizer.load(directory, checkpoint.name)
        return cls(text, tokenizer, enc_token_id(tokenizer, config), info, device, dtype, vision, int8)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> ImageEncoding:
        pixels = pixel_values.to(self.device, self.dtype)
        features, embeddings = self._run_vision(lambda tower, batch: tower(batch), pixels)  # (B, T, H), (B, D)
        return ImageEncoding(embeddings=embeddings[:, None, :].cpu(), features=features)

    @torch.inference_mode()
    def itm_scores(self, tokens: TextTokens, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        features = torch.as_tensor(features)
        enc_ids = tokens.input_ids.clone()
        enc_ids[:, 0] = self.enc_token_id  # BLIP's training convention, see the module docstring
        input_ids, attention_mask = paired(TextTokens(enc_ids, tokens.attention_mask), features.shape[0])
        logits = run_in_chunks(lambda image, ids, mask: self.text.itm_logits(ids, mask, image),  # (N, 2)
                               features.to(self.device, self.dtype), input_ids.to(self.device),
                               attention_mask.to(self.device))
        return logits.cpu()  # (N, 2)
