"""BLIP-2 retrieval checkpoints, as transformers' `Blip2ForImageTextRetrieval` stores them (model_type "blip-2":
Salesforce/blip2-itm-vit-g at 224 px, blip2-itm-vit-g-coco at 364 px).

The engine runs the parts itself so that stored ViT tokens are reused: BLIP's ViT body (blip_vision.py
`VisionTransformer`, with ViT-g's sizes from blip2_vision.py) for pixels -> (B, T, 1408) tokens, which the
index keeps for ITM, and `QFormerTower` (qformer.py) for the (B, 32, 256) image vectors, the (N, 256) text
vectors and the ITM logits. Both hold the checkpoint's own tensors under transformers' names and are tested
equal to transformers (tests/test_blip2.py).

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
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ModelLoadError
from .adapter import Adapter, fitting_config, paired
from .base import ImageEncoding, ModelInfo, TextTokens
from .blip2_vision import vision_config
from .blip_vision import VisionTowerConfig, VisionTransformer
from .loading import Checkpoint, WeightsSpec, local_directory, read_config, read_state, revision
from .preprocessing import read_preprocessing
from .qformer import QFormerConfig, QFormerTower
from .tokenizer import TextTokenizer

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

# Modules that a retrieval checkpoint must carry trained weights for (a captioning checkpoint,
# Blip2ForConditionalGeneration, has the first three but none of the rest).
REQUIRED_MODULES = ("vision_model", "query_tokens", "qformer", "embeddings", "vision_projection", "text_projection",
                    "itm_head")
QFORMER_MODULES = ("query_tokens", "embeddings.", "qformer.", "vision_projection.", "text_projection.", "itm_head.")
VISION_MODULES = ("vision_model.",)
WEIGHTS = WeightsSpec("Blip2ForImageTextRetrieval", REQUIRED_MODULES,
                      "it is not a BLIP-2 image-text retrieval checkpoint (captioning and VQA ones, "
                      "Blip2ForConditionalGeneration, are not); use e.g. Salesforce/blip2-itm-vit-g")


class Blip2RetrievalModel(Adapter):
    """A BLIP-2 retrieval checkpoint on one device and dtype; implements `RetrievalModel`."""

    def __init__(self, qformer: QFormerTower, tokenizer: TextTokenizer, info: ModelInfo, device: torch.device,
                 dtype: torch.dtype, vision: VisionTransformer | None = None, int8: bool = False):
        super().__init__(tokenizer, info, device, dtype, vision, int8)
        self.qformer = self.text_tower = qformer.to(device=device).eval()  # fp32 weights: see the module docstring

    @classmethod
    def load(cls, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype,
             with_vision: bool = True, int8: bool = False) -> Blip2RetrievalModel:
        directory = local_directory(checkpoint)
        config = read_config(directory, checkpoint.name)
        try:
            vision_c, qformer_c = vision_config(config), QFormerConfig.from_blip2_config(config)
        except ValueError as exc:
            raise ModelLoadError(f"model {checkpoint.name}: {exc}") from exc
        info = _model_info(checkpoint, directory, config, vision_c)
        modules = QFORMER_MODULES + (VISION_MODULES if with_vision else ())
        # the ViT comes in the engine's dtype as it is read; the Q-Former stays fp32 (module docstring)
        state = read_state(checkpoint.name, directory, info, modules, WEIGHTS, dict.fromkeys(VISION_MODULES, dtype))
        with fitting_config(checkpoint.name):
            qformer = QFormerTower(qformer_c)
            qformer.load_weights(state)
            vision = VisionTransformer(vision_c) if with_vision else None
            if vision is not None:
                vision.load_weights(state)
        return cls(qformer, TextTokenizer.load(directory, checkpoint.name), info, device, dtype, vision, int8)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> ImageEncoding:
        def encode(vision: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = vision(pixels)  # (B, T, Hv)
            return features, self.qformer.embed_images(features)  # (B, Q, D)

        features, embeddings = self._run_vision(encode, pixel_values.to(self.device, self.dtype))
        return ImageEncoding(embeddings=embeddings.cpu(), features=features)

    @torch.inference_mode()
    def itm_scores(self, tokens: TextTokens, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        features = torch.as_tensor(features)
        input_ids, attention_mask = paired(tokens, features.shape[0])
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
