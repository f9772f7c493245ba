"""BLIP's vision tower for inference: the ViT body (`VisionTransformer`, BLIP-2's image tower too) and
`BlipVisionTower`, the body plus BLIP's `vision_proj`.

Parameter names mirror transformers' `BlipForImageTextRetrieval` (`vision_model.*`, `vision_proj.*`), so
a checkpoint's tensors load as they are. The computation is transformers' `BlipVisionModel` with its
eager attention (a materialised T x T score matrix per head) replaced by a fused kernel (`layers.attention`:
in bf16 on CPUs with AVX512-BF16 and no AMX the kernel blipsearch builds (`native.py`) where it can, else
oneDNN Graph's; elsewhere `F.scaled_dot_product_attention`) and the MLP's gelu applied inside its first linear
layer; tests/test_blip_vision.py and tests/test_native_attention.py compare them with transformers, float64
and fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerNorm, Linear, PatchEmbedding, attention, linear_gelu, load_weights


@dataclass(frozen=True)
class VisionTowerConfig:
    image_size: int = 384
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    embed_dim: int = 256  # ITC projection size

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + [CLS]

    @classmethod
    def from_blip_config(cls, config: dict) -> VisionTowerConfig:
        vision = config.get("vision_config", {})
        if vision.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"vision activation {vision['hidden_act']!r} is not BLIP's gelu")
        return cls(
            image_size=vision.get("image_size", 384), patch_size=vision.get("patch_size", 16),
            hidden_size=vision.get("hidden_size", 768), num_layers=vision.get("num_hidden_layers", 12),
            num_heads=vision.get("num_attention_heads", 12), intermediate_size=vision.get("intermediate_size", 3072),
            layer_norm_eps=vision.get("layer_norm_eps", 1e-5), embed_dim=config.get("image_text_hidden_size", 256),
        )


class _Layer(nn.Module):
    def __init__(self, c: VisionTowerConfig):
        super().__init__()
        self.heads = c.num_heads
        self.layer_norm1 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = nn.Module()
        self.self_attn.qkv = Linear(c.hidden_size, 3 * c.hidden_size)
        self.self_attn.projection = Linear(c.hidden_size, c.hidden_size)
        self.layer_norm2 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = Linear(c.hidden_size, c.intermediate_size)
        self.mlp.fc2 = Linear(c.intermediate_size, c.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        qkv = self.self_attn.qkv(self.layer_norm1(h)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        context = attention(qkv[0], qkv[1], qkv[2])  # (B, nh, T, hs)
        h = h + self.self_attn.projection(context.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp.fc2(linear_gelu(self.layer_norm2(h), self.mlp.fc1))


class VisionTransformer(nn.Module):
    """The ViT body, transformers' `vision_model`: pixels (B, 3, H, W) -> tokens after the final LayerNorm
    (B, T, Hv). BLIP projects token 0 with `vision_proj`; BLIP-2 hands all T tokens to its Q-Former."""

    def __init__(self, c: VisionTowerConfig):
        super().__init__()
        self.config = c
        emb = self.embeddings = nn.Module()
        emb.class_embedding = nn.Parameter(torch.empty(1, 1, c.hidden_size), requires_grad=False)
        emb.patch_embedding = PatchEmbedding(3, c.hidden_size, c.patch_size)
        emb.position_embedding = nn.Parameter(torch.empty(1, c.tokens, c.hidden_size), requires_grad=False)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_layers))
        self.post_layernorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def load_weights(self, state: dict[str, torch.Tensor], prefix: str = "vision_model.") -> None:
        """Take the ViT's tensors (`prefix` + our names) from a checkpoint's state dict; a missing one is an error."""
        load_weights(self, state, "vision", prefix)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        patches = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, T-1, Hv)
        cls = emb.class_embedding.expand(patches.shape[0], 1, -1)
        h = torch.cat([cls, patches], dim=1) + emb.position_embedding  # (B, T, Hv)
        for layer in self.encoder.layers:
            h = layer(h)
        return self.post_layernorm(h)


class BlipVisionTower(nn.Module):
    """Pixels -> (token features for ITM, normalised ITC embedding)."""

    def __init__(self, c: VisionTowerConfig):
        super().__init__()
        self.config = c
        self.vision_model = VisionTransformer(c)
        self.vision_proj = Linear(c.hidden_size, c.embed_dim)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Take this tower's tensors from a BLIP retrieval state dict; a missing one is an error."""
        load_weights(self, state, "vision")

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> features (B, T, Hv) after the final LayerNorm, embeddings (B, D) float32."""
        features = self.vision_model(pixel_values)
        return features, F.normalize(self.vision_proj(features[:, 0, :]).float(), dim=-1)
