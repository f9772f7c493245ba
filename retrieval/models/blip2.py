"""BLIP-2 retrieval checkpoints, as transformers' `Blip2ForImageTextRetrieval` stores them (model_type "blip-2":
Salesforce/blip2-itm-vit-g at 224 px, blip2-itm-vit-g-coco at 364 px).

The engine runs the parts itself so that stored ViT tokens are reused: `Blip2VisionTower` (blip2_vision.py)
for pixels -> (B, T, 1408) tokens, which the index keeps for ITM, and `QFormerTower` (qformer.py) for the
(B, 32, 256) image vectors, the (N, 256) text vectors and the ITM logits. Both hold the checkpoint's own
tensors under transformers' names and are tested equal to transformers (tests/test_blip2.py).

Conventions, as LAVIS's `compute_sim_matrix` and transformers' retrieval `forward`:
- ITC = max over the 32 query vectors of query . text (raw cosine); the index does the max (recall.py).
- ITM = `itm_head` on the 32 query outputs of a joint query + text pass, averaged over the queries; the
  text starts with [CLS] (BLIP-2 has no [ENC] convention, unlike BLIP).
- Text is tokenised here with the checkpoint's BERT tokenizer, at most 35 tokens, and no image
  placeholders: transformers 5's `Blip2Processor` prepends `num_query_tokens` `<image>` tokens when given
  images, which the model then strips again (`image_token_index`); we never add them.
- Precision: the ViT runs in the engine's dtype (bf16 on CPUs with bf16 units). The Q-Former keeps fp32
  weights, as transformers does: the ITC passes (once per image, once per query, ~2% of the ViT's work)
  run in fp32, and ITM, the search's hot loop (~12 GFLOP per pair), runs its matmuls in the engine's
  dtype under autocast, with LayerNorm, softmax and the residual stream in fp32 (LAVIS trained the
  Q-Former under fp16 autocast). On a full-width random Q-Former that is within ~8% of the speed of a
  Q-Former cast to bf16 and ~2.5x closer to fp32; tests/test_blip2.py bounds the end-to-end bf16 error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError
from .base import ImageEncoding, ModelInfo, TextEncoding, TextTokens
from .blip import MAX_TEXT_TOKENS, _tokenizer_via_transformers
from .blip2_vision import Blip2VisionTower, vision_config
from .blip_vision import VisionTowerConfig
from .loading import (
    Checkpoint,
    converted_directory,
    from_pretrained,
    has_safetensors,
    local_directory,
    read_config,
    read_tensors,
    revision,
    safetensors_keys,
    save_converted,
)
from .preprocessing import read_preprocessing
from .qformer import QFormerConfig, QFormerTower
from .tokenizer import TextTokenizer

log = logging.getLogger(__name__)

# Modules that a retrieval checkpoint must carry trained weights for (a captioning checkpoint,
# Blip2ForConditionalGeneration, has the first three but none of the rest).
REQUIRED_MODULES = ("vision_model", "query_tokens", "qformer", "embeddings", "vision_projection", "text_projection",
                    "itm_head")
QFORMER_MODULES = ("query_tokens", "embeddings.", "qformer.", "vision_projection.", "text_projection.", "itm_head.")
VISION_MODULES = ("vision_model.",)


class Blip2RetrievalModel:
    """A BLIP-2 retrieval checkpoint on one device and dtype; implements `RetrievalModel`."""

    def __init__(self, qformer: QFormerTower, tokenizer: TextTokenizer, info: ModelInfo, device: torch.device,
                 dtype: torch.dtype, vision: Blip2VisionTower | None = None):
        self.qformer = qformer.to(device=device).eval()  # fp32 weights: see the module docstring
        self.vision = None if vision is None else vision.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        self.dtype = dtype
        pre = info.preprocessing
        # Rescale and normalise in one step, as the image processor does: (x / 255 - mean) / std.
        self._pixel_mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0
        self._pixel_std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0

    @classmethod
    def load(cls, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype,
             with_vision: bool = True) -> Blip2RetrievalModel:
        directory = local_directory(checkpoint)
        config = read_config(directory, checkpoint.name)
        try:
            vision_c, qformer_c = vision_config(config), QFormerConfig.from_blip2_config(config)
        except ValueError as exc:
            raise ModelLoadError(f"model {checkpoint.name}: {exc}") from exc
        info = _model_info(checkpoint, directory, config, vision_c)
        state = _read_state(checkpoint.name, directory, info, QFORMER_MODULES + (VISION_MODULES if with_vision else ()))
        try:
            qformer = QFormerTower(qformer_c)
            qformer.load_weights(state)
            vision = Blip2VisionTower(vision_c) if with_vision else None
            if vision is not None:
                vision.load_weights(state)
        except (KeyError, RuntimeError, ValueError) as exc:  # sizes in config.json and tensors disagree
            raise ModelLoadError(f"model {checkpoint.name} does not fit its config.json: {exc}") from exc
        tokenizer = TextTokenizer.from_directory(directory, MAX_TEXT_TOKENS) or _tokenizer_via_transformers(
            directory, checkpoint.name)
        return cls(qformer, tokenizer, info, device, dtype, vision)

    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        return (batch - self._pixel_mean) / self._pixel_std

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> ImageEncoding:
        if self.vision is None:
            raise ModelLoadError("this model was loaded without its vision tower; load it with_vision=True")
        features = self.vision(pixel_values.to(self.device, self.dtype))  # (B, T, Hv)
        embeddings = self.qformer.embed_images(features)  # (B, Q, D)
        return ImageEncoding(embeddings=embeddings.cpu(), features=features)

    def tokenize(self, texts: list[str]) -> TextTokens:
        """[CLS] text [SEP], at most 35 tokens, padded to the longest; no image placeholder tokens."""
        return self.tokenizer(texts)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> TextEncoding:
        tokens = self.tokenize(texts)
        embeddings = self.qformer.embed_texts(tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device))
        return TextEncoding(embeddings=embeddings.cpu(), tokens=tokens)

    @torch.inference_mode()
    def itm_scores(self, tokens: TextTokens, features: torch.Tensor) -> torch.Tensor:
        input_ids, attention_mask = tokens.input_ids, tokens.attention_mask
        if input_ids.shape[0] == 1 and features.shape[0] > 1:  # one text against K images
            input_ids = input_ids.expand(features.shape[0], -1)
            attention_mask = attention_mask.expand(features.shape[0], -1)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = self.qformer.itm_logits(input_ids.to(self.device), attention_mask.to(self.device),
                                             features.to(self.device, self.dtype))
        return logits.cpu()  # (N, 2)


def _model_info(checkpoint: Checkpoint, directory: Path, config: dict, vision: VisionTowerConfig) -> ModelInfo:
    return ModelInfo(
        model_id=checkpoint.model_id,
        revision=revision(checkpoint, directory),
        family="blip-2",
        embed_dim=config.get("image_text_hidden_size", 256),
        vectors_per_image=config.get("num_query_tokens", 32),
        feature_tokens=vision.tokens,  # patches + [CLS]: 257 at 224 px, 677 at 364 px
        feature_dim=vision.hidden_size,  # 1408 for ViT-g
        preprocessing=read_preprocessing(directory, checkpoint.name, vision.image_size),
    )


def _read_state(name: str, directory: Path, info: ModelInfo, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of `modules`: from safetensors (the checkpoint's own, or a converted copy in the user
    cache), else through transformers, which reads any format; that copy is then cached as safetensors."""
    if has_safetensors(directory):
        return _safetensors_state(directory, name, modules)
    converted = converted_directory(info.model_id, info.revision)
    if has_safetensors(converted):
        try:
            return _safetensors_state(converted, name, modules)
        except ModelLoadError as exc:  # a damaged cache is rebuilt, not reported as a damaged model
            log.warning("converting model %s again: its cached copy is unreadable (%s)", name, exc)
    state = _state_via_transformers(directory, name)
    save_converted(converted, state)
    return state


def _safetensors_state(directory: Path, name: str, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    _refuse_missing(name, set(REQUIRED_MODULES) - {key.split(".")[0] for key in safetensors_keys(directory, name)})
    return read_tensors(directory, name, modules)


def _state_via_transformers(directory: Path, name: str) -> dict[str, torch.Tensor]:
    """All tensors, read by `Blip2ForImageTextRetrieval` (any weight format); refuses untrained heads."""
    from transformers import Blip2ForImageTextRetrieval

    model, loading = from_pretrained(directory, name, Blip2ForImageTextRetrieval, output_loading_info=True)
    missing = {key.split(".")[0] for key in loading.get("missing_keys", ())}
    missing |= {key.split(".")[0] for key, *_ in loading.get("mismatched_keys", ())}
    _refuse_missing(name, missing)
    return model.state_dict()


def _refuse_missing(name: str, missing: set[str]) -> None:
    """Refuse checkpoints whose retrieval modules would be left at random initialisation."""
    absent = sorted(missing & set(REQUIRED_MODULES))
    if absent:
        raise ModelLoadError(
            f"model {name} has no trained weights for {', '.join(absent)}: it is not a BLIP-2 image-text "
            "retrieval checkpoint (captioning and VQA ones, Blip2ForConditionalGeneration, are not); use e.g. "
            "Salesforce/blip2-itm-vit-g")
