"""The sizes of BLIP's text side (BERT with cross-attention), shared by its torch and numpy implementations."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextTowerConfig:
    vocab_size: int = 30524
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    layer_norm_eps: float = 1e-12
    image_hidden_size: int = 768  # width of the vision tokens the cross-attention reads
    embed_dim: int = 256  # ITC projection size

    @classmethod
    def from_blip_config(cls, config: dict) -> TextTowerConfig:
        """From a BLIP `config.json` (as a dict): its text_config plus the shared sizes."""
        text, vision = config.get("text_config", {}), config.get("vision_config", {})
        if text.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"text activation {text['hidden_act']!r} is not BLIP's gelu")
        return cls(
            vocab_size=text.get("vocab_size", 30524), hidden_size=text.get("hidden_size", 768),
            num_layers=text.get("num_hidden_layers", 12), num_heads=text.get("num_attention_heads", 12),
            intermediate_size=text.get("intermediate_size", 3072),
            max_positions=text.get("max_position_embeddings", 512),
            layer_norm_eps=text.get("layer_norm_eps", 1e-12),
            image_hidden_size=vision.get("hidden_size", 768),
            embed_dim=config.get("image_text_hidden_size", 256),
        )
