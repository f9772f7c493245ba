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
`enc_token_id` at position 0; see `_enc_token_id`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .adapter import Adapter, fitting_config, paired
from .base import ImageEncoding, ModelInfo, TextTokens
from .blip_text import BlipTextTower, TextTowerConfig
from .blip_vision import BlipVisionTower, VisionTowerConfig
from .loading import Checkpoint, WeightsSpec, local_directory, read_config, read_state, revision
from .preprocessing import read_preprocessing
from .tokenizer import TextTokenizer

log = logging.getLogger(__name__)

# Modules that a retrieval checkpoint must carry trained weights for.
REQUIRED_MODULES = ("vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head")
TEXT_MODULES = ("text_encoder.", "text_proj.", "itm_head.")
VISION_MODULES = ("vision_model.", "vision_proj.")
WEIGHTS = WeightsSpec("BlipForImageTextRetrieval", REQUIRED_MODULES,
                      "it is not an image-text retrieval checkpoint (captioning and VQA ones are not); use e.g. "
                      "Salesforce/blip-itm-base-coco")


class BlipRetrievalModel(Adapter):
    """A BLIP retrieval checkpoint on one device and dtype; implements `RetrievalModel`."""

    def __init__(self, text: BlipTextTower, tokenizer: TextTokenizer, enc_token_id: int, info: ModelInfo,
                 device: torch.device, dtype: torch.dtype, vision: BlipVisionTower | None = None):
        super().__init__(tokenizer, info, device, dtype, vision)
        self.text = self.text_tower = text.to(device=device, dtype=dtype).eval()
        self.enc_token_id = enc_token_id

    @classmethod
    def load(cls, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype,
             with_vision: bool = True) -> BlipRetrievalModel:
        directory = local_directory(checkpoint)
        config = read_config(directory, checkpoint.name)
        info = _model_info(checkpoint, directory, config)
        modules = TEXT_MODULES + (VISION_MODULES if with_vision else ())
        state = read_state(checkpoint.name, directory, info, modules, WEIGHTS, dict.fromkeys(modules, dtype))
        with fitting_config(checkpoint.name):
            text = BlipTextTower(TextTowerConfig.from_blip_config(config))
            vision = BlipVisionTower(VisionTowerConfig.from_blip_config(config)) if with_vision else None
            text.load_weights(state)
            if vision is not None:
                vision.load_weights(state)
        tokenizer = TextTokenizer.load(directory, checkpoint.name)
        return cls(text, tokenizer, _enc_token_id(tokenizer, config), info, device, dtype, vision)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> ImageEncoding:
        features, embeddings = self._vision_tower()(pixel_values.to(self.device, self.dtype))  # (B, T, H), (B, D)
        return ImageEncoding(embeddings=embeddings[:, None, :].cpu(), features=features)

    @torch.inference_mode()
    def itm_scores(self, tokens: TextTokens, features: torch.Tensor) -> torch.Tensor:
        enc_ids = tokens.input_ids.clone()
        enc_ids[:, 0] = self.enc_token_id  # BLIP's training convention, see the module docstring
        input_ids, attention_mask = paired(TextTokens(enc_ids, tokens.attention_mask), features.shape[0])
        logits = self.text.itm_logits(input_ids.to(self.device), attention_mask.to(self.device),  # (N, 2)
                                      features.to(self.device, self.dtype))
        return logits.cpu()  # (N, 2)


def _enc_token_id(tokenizer: TextTokenizer, config: dict) -> int:
    """The `[ENC]` id: the tokenizer's own, else the id BLIP's tokenizer gives it (right after `[DEC]`).

    BLIP adds `[DEC]` (the bos token, 30522 in BERT's vocabulary) and then `[ENC]` (30523); the Hugging
    Face conversions keep the embedding rows but not always the token in the tokenizer files.
    """
    enc = tokenizer.token_id("[ENC]")
    if enc is not None:
        return int(enc)
    text = config.get("text_config", {})
    enc = text.get("bos_token_id", 30522) + 1
    if enc >= text.get("vocab_size", 30524):
        raise ModelLoadError("the checkpoint's tokenizer has no [ENC] token and its vocabulary has no row "
                             "after [DEC] to stand for it; it cannot score image-text matches")
    return int(enc)


def _model_info(checkpoint: Checkpoint, directory: Path, config: dict) -> ModelInfo:
    vision = config.get("vision_config", {})
    image_size, patch_size = vision.get("image_size", 384), vision.get("patch_size", 16)
    return ModelInfo(
        model_id=checkpoint.model_id,
        revision=revision(checkpoint, directory),
        family="blip",
        embed_dim=config.get("image_text_hidden_size", 256),
        vectors_per_image=1,
        feature_tokens=(image_size // patch_size) ** 2 + 1,  # patches + [CLS]
        feature_dim=vision.get("hidden_size", 768),
        preprocessing=read_preprocessing(directory, checkpoint.name, image_size),
    )
