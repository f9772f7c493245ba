"""BLIP-2's Q-Former for inference: learned queries that read the ViT tokens, and the BERT text encoder
that shares their self-attention; with `vision_projection`, `text_projection` and `itm_head`.

Parameter names are transformers' `Blip2ForImageTextRetrieval` ones (`query_tokens`, `embeddings.*`,
`qformer.*`, the three heads), so a checkpoint's tensors load as they are. One encoder serves three passes:

    queries only     (B, Q)      queries cross-attend the image      -> Q image vectors for ITC (max over them)
    text only        (N, L)      plain BERT, no image                -> [CLS] text vector for ITC
    queries + text   (N, Q + L)  one self-attention over both; only  -> ITM logits averaged over the Q queries
                                 the queries cross-attend the image

Cross-attention sits in every `cross_attention_frequency`-th layer from layer 0; queries and text share
the attention weights but have their own feed-forward blocks (`*_query` for the queries). The attention
maths is BLIP's text tower's (blip_text.py): SDPA self-attention, and cross-attention folded so that the
T image tokens are never projected to keys and values (exact; derived there). For Q queries against
ViT-g's 1408-wide tokens this is ~1.6x fewer multiply-adds than projecting them per layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blip_text import Attention, TextTowerConfig
from .layers import Embedding, LayerNorm, Linear, linear_gelu, load_weights


@dataclass(frozen=True)
class QFormerConfig(TextTowerConfig):
    """BERT-base sizes as in BLIP-2; `image_hidden_size` is the ViT's width (1408 for EVA ViT-g)."""

    vocab_size: int = 30523  # BERT's 30522 + [DEC]
    image_hidden_size: int = 1408
    cross_attention_frequency: int = 2  # layers 0, 2, 4, ... cross-attend the image
    num_query_tokens: int = 32

    @classmethod
    def from_blip2_config(cls, config: dict) -> QFormerConfig:
        """From a BLIP-2 `config.json` (as a dict); absent keys take transformers' Blip2 defaults."""
        q, vision = config.get("qformer_config", {}), config.get("vision_config", {})
        # The BERT keys are read as BLIP's text config; of their defaults only the vocabulary differs. The
        # cross-attention width is the ViT's (transformers sets `encoder_hidden_size` from it).
        bert = TextTowerConfig.from_blip_config({
            "text_config": {"vocab_size": 30522} | q, "vision_config": {"hidden_size": vision.get("hidden_size", 1408)},
            "image_text_hidden_size": config.get("image_text_hidden_size", 256)})
        return cls(**asdict(bert), cross_attention_frequency=q.get("cross_attention_frequency", 2),
                   num_query_tokens=config.get("num_query_tokens", 32))


def _compute_dtype(device_type: str, weights: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in: autocast's where it is on, else the weights'."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weights


def _feed_forward(c: QFormerConfig) -> tuple[nn.Module, nn.Module]:
    """`intermediate.dense` and `output.{dense,LayerNorm}` of one BERT feed-forward block."""
    intermediate, output = nn.Module(), nn.Module()
    intermediate.dense = Linear(c.hidden_size, c.intermediate_size)
    output.dense = Linear(c.intermediate_size, c.hidden_size)
    output.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
    return intermediate, output


def _apply_feed_forward(intermediate: nn.Module, output: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return output.LayerNorm(output.dense(linear_gelu(h, intermediate.dense)) + h)


class _Layer(nn.Module):
    def __init__(self, c: QFormerConfig, cross: bool):
        super().__init__()
        # the projections are `attention.{query,key,value}` where BERT has `self.*`
        self.attention = Attention(c, c.hidden_size, inner="attention")
        self.crossattention = Attention(c, c.image_hidden_size, inner="attention") if cross else None
        self.intermediate, self.output = _feed_forward(c)  # text tokens
        self.intermediate_query, self.output_query = _feed_forward(c)  # queries

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, queries: int, image: torch.Tensor | None,
                first_only: bool = False) -> torch.Tensor:
        """h (B, Q + L, H): `queries` query rows first; image (B or 1, T, Hv) when queries are present."""
        h = self.attention.self_attention(h, mask, first_only)
        # contiguous halves: F.linear on a strided 3-D slice falls back to a batched matmul that copies the weight
        q, t = h[:, :queries].contiguous(), h[:, queries:].contiguous()
        parts = []
        if queries:
            if self.crossattention is not None:
                q = self.crossattention.folded_cross_attention(q, image)
            parts.append(_apply_feed_forward(self.intermediate_query, self.output_query, q))
        if t.shape[1]:
            parts.append(_apply_feed_forward(self.intermediate, self.output, t))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class QFormerTower(nn.Module):
    """ViT tokens -> Q image vectors; texts -> one vector each; (text, image tokens) -> ITM logits."""

    def __init__(self, c: QFormerConfig):
        super().__init__()
        self.config = c
        self.query_tokens = nn.Parameter(torch.empty(1, c.num_query_tokens, c.hidden_size), requires_grad=False)
        self.embeddings = nn.Module()  # no LayerNorm here: `qformer.layernorm` normalises queries and text alike
        self.embeddings.word_embeddings = Embedding(c.vocab_size, c.hidden_size)
        self.embeddings.position_embeddings = Embedding(c.max_positions, c.hidden_size)
        self.qformer = nn.Module()
        self.qformer.layernorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.qformer.encoder = nn.Module()
        self.qformer.encoder.layer = nn.ModuleList(
            _Layer(c, cross=i % c.cross_attention_frequency == 0) for i in range(c.num_layers))
        self.vision_projection = Linear(c.hidden_size, c.embed_dim)
        self.text_projection = Linear(c.hidden_size, c.embed_dim)
        self.itm_head = Linear(c.hidden_size, 2)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Take the Q-Former's tensors from a BLIP-2 retrieval state dict; a missing one is an error."""
        load_weights(self, state, "Q-Former")

    def _encode(self, batch: int, *, queries: bool, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, Q + L, H) of the last layer; without queries, of position 0 only (B, 1, H)."""
        parts, q = [], self.config.num_query_tokens if queries else 0
        if queries:
            parts.append(self.query_tokens.expand(batch, -1, -1))  # (B, Q, H)
        if input_ids is not None:
            emb = self.embeddings
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # text positions start at 0
            parts.append(emb.word_embeddings(input_ids) + emb.position_embeddings(positions))  # (B, L, H)
        h = self.qformer.layernorm(torch.cat(parts, dim=1))
        mask = None  # padding keys are masked for every row: (B, 1, 1, Q + L); queries are always valid
        if attention_mask is not None and not bool(attention_mask.all()):
            valid = attention_mask.new_ones(batch, q)
            mask = torch.cat([valid, attention_mask], dim=1)[:, None, None, :].bool()
        if image is not None:  # fp32 for ITC; under autocast (ITM) the matmuls' dtype: cast once, not per layer
            image = image.to(_compute_dtype(image.device.type, self.query_tokens.dtype))
        layers = self.qformer.encoder.layer
        for i, layer in enumerate(layers):
            h = layer(h, mask, q, image, first_only=not queries and i == len(layers) - 1)
        return h

    def embed_images(self, image: torch.Tensor) -> torch.Tensor:
        """(B, T, Hv) ViT tokens -> (B, Q, D) normalised ITC vectors, float32."""
        h = self._encode(image.shape[0], queries=True, image=image)  # (B, Q, H)
        return F.normalize(self.vision_projection(h).float(), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L) tokens with [CLS] first -> (N, D) normalised ITC vectors, float32."""
        h = self._encode(input_ids.shape[0], queries=False, input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self.text_projection(h[:, 0]).float(), dim=-1)  # h: (N, 1, H)

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(N, L) tokens with [CLS] first, (N or 1, T, Hv) ViT tokens -> (N, 2) ITM logits averaged over the
        queries, float32."""
        h = self._encode(input_ids.shape[0], queries=True, input_ids=input_ids, attention_mask=attention_mask,
                         image=image)  # (N, Q + L, H)
        return self.itm_head(h[:, :self.config.num_query_tokens]).float().mean(dim=1)
