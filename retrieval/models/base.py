"""The contract between the engine and a vision-language model.

The indexer and the searcher only ever call `encode_images`, `encode_texts` and `itm_scores`; a BLIP-2
adapter implements the same three with 32 vectors per image and Q-Former features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded RGB image becomes pixel values: the checkpoint's own image-processor settings."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"  # PIL filter name used for the resize
    exif_transpose: bool = True  # camera orientation is applied before resizing

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """What the index records about the model that produced its vectors."""

    model_id: str  # hub id or absolute local path
    revision: str  # hub commit hash, or a fingerprint of a local directory
    family: str  # "blip" or "blip-2"
    embed_dim: int  # ITC embedding size (256 for BLIP)
    vectors_per_image: int  # 1 for BLIP, 32 for BLIP-2
    feature_tokens: int  # ITM cross-attention tokens per image (577 for ViT-B/16 at 384 px)
    feature_dim: int  # width of those tokens (768 for ViT-B)
    preprocessing: Preprocessing


@dataclass
class TextTokens:
    """torch tensors, or numpy arrays for the numpy text side (blip_numpy.py): each model reads its own."""

    input_ids: torch.Tensor | np.ndarray  # (N, L) int64, [CLS] at position 0
    attention_mask: torch.Tensor | np.ndarray  # (N, L) int64


@dataclass
class ImageEncoding:
    embeddings: torch.Tensor  # (B, V, D) L2-normalised ITC vectors, float32
    features: torch.Tensor  # (B, T, H) token features the ITM head attends to


@dataclass
class TextEncoding:
    embeddings: torch.Tensor | np.ndarray  # (N, D) L2-normalised ITC vectors, float32, on the CPU
    tokens: TextTokens  # kept for the ITM pass


class RetrievalModel(Protocol):
    """A loaded checkpoint, on one device, in one precision."""

    info: ModelInfo
    device: torch.device | str  # the numpy text side (blip_numpy.py): "cpu"

    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels from uint8 RGB arrays already resized to `info.preprocessing`."""
        ...

    def encode_images(self, pixel_values: torch.Tensor) -> ImageEncoding: ...

    def encode_texts(self, texts: list[str]) -> TextEncoding: ...

    def itm_scores(self, tokens: TextTokens, features: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """ITM logits (N, 2) [no match, match] for text row i against image features row i.

        A single text (N=1) is matched against every row of `features` (K, T, H), and a single image
        (features (1, T, H)) against every text row. `features` may be a numpy array or a tensor; the logits
        come back on the CPU as the model's own kind (torch adapters: a tensor; the numpy text side: an array),
        which `np.asarray` reads either way.
        """
        ...
