"""BLIP's text side for inference: the BERT encoder (unimodal and image-grounded), `text_proj`, `itm_head`.

Parameter names mirror transformers' `BlipForImageTextRetrieval` (`text_encoder.*`, `text_proj.*`,
`itm_head.*`), so a checkpoint's tensors load as they are. The forward passes differ from transformers'
in two ways that keep results equal (tests/test_blip_text.py compares them in fp32):

- attention runs through `F.scaled_dot_product_attention`;
- cross-attention is *folded*: instead of projecting the T image tokens x to keys and values per layer
  (2 T H^2 multiply-adds per image, ~70% of ITM's work at T=577), the query side absorbs the projections:
      scores_h = (q_h W_k,h) x^T / sqrt(d)       (q_h . b_k,h is the same for every key: softmax drops it)
      out_h    = (softmax(scores_h) x) W_v,h^T + b_v,h     (rows of softmax sum to 1)
  which costs about 2 L nh T H for a text of L tokens, nh heads: 4-6x less for short queries;
- the last layer computes position 0 only: `text_proj` and `itm_head` read nothing else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Embedding, LayerNorm, Linear, linear_gelu, load_weights
from .text_config import TextTowerConfig

__all__ = ["Attention", "BlipTextTower", "TextTowerConfig"]


class Attention(nn.Module):
    """`attention.<inner>.{query,key,value}` + `attention.output.{dense,LayerNorm}` of one BERT layer.

    `inner` is the projections' module name in the checkpoint: BERT's (BLIP's) `self`, the Q-Former's
    `attention`; the maths reads them as `projections` whatever their name.
    """

    def __init__(self, c: TextTowerConfig, kv_size: int, inner: str = "self"):
        super().__init__()
        projections = nn.Module()
        projections.query = Linear(c.hidden_size, c.hidden_size)
        projections.key = Linear(kv_size, c.hidden_size)
        projections.value = Linear(kv_size, c.hidden_size)
        self.add_module(inner, projections)
        self._inner = inner
        self.output = nn.Module()
        self.output.dense = Linear(c.hidden_size, c.hidden_size)
        self.output.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.heads = c.num_heads

    @property
    def projections(self) -> nn.Module:
        return self._modules[self._inner]

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, H) -> (B, nh, L, hs)
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def _finish(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = context.shape  # (B, nh, L, hs)
        merged = context.transpose(1, 2).reshape(b, n, -1)
        return self.output.LayerNorm(self.output.dense(merged) + residual)

    def self_attention(self, h: torch.Tensor, mask: torch.Tensor | None, first_only: bool = False) -> torch.Tensor:
        """Bidirectional self-attention; `first_only` computes the output at position 0 alone."""
        s = self.projections
        # a contiguous copy of row 0: F.linear on the strided (B, 1, H) slice falls back to a slow path
        # (18-40x slower in bf16 at B = 256 on our CPUs)
        rows = h[:, :1].contiguous() if first_only else h
        q, k, v = self._split(s.query(rows)), self._split(s.key(h)), self._split(s.value(h))
        return self._finish(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rows)

    def folded_cross_attention(self, h: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """h (B, L, H) text states; image (B or 1, T, Hv) tokens, all valid. Exact, without the image's K/V."""
        s, nh = self.projections, self.heads
        b, n, d = h.shape
        hs, hv = d // nh, image.shape[-1]
        # per head, queries move into image space: (nh, B*L, hs) @ (nh, hs, Hv) -> (nh, B*L, Hv)
        q = s.query(h).view(b * n, nh, hs).transpose(0, 1)
        w_k = s.key.weight.view(nh, hs, hv) / math.sqrt(hs)
        q_x = torch.bmm(q, w_k).view(nh, b, n, hv).transpose(0, 1).reshape(b, nh * n, hv)  # (B, nh*L, Hv)
        if image.shape[0] == 1 < b:  # one image for every text: one large matmul instead of B small ones
            q_x = q_x.reshape(1, b * nh * n, hv)
        probs = torch.bmm(q_x, image.transpose(1, 2)).softmax(dim=-1)  # (B, nh*L, T)
        mixed = torch.bmm(probs, image)  # (B, nh*L, Hv): attention-weighted image tokens
        # ... and come back through the value projection: (nh, B*L, Hv) @ (nh, Hv, hs) -> (nh, B*L, hs)
        mixed = mixed.view(b, nh, n, hv).transpose(0, 1).reshape(nh, b * n, hv)
        w_v = s.value.weight.view(nh, hs, hv).transpose(1, 2)
        context = torch.bmm(mixed, w_v).view(nh, b, n, hs).permute(1, 0, 2, 3) + s.value.bias.view(nh, 1, hs)
        return self._finish(context, h)  # context (B, nh, L, hs)


class _Layer(nn.Module):
    def __init__(self, c: TextTowerConfig):
        super().__init__()
        self.attention = Attention(c, c.hidden_size)
        self.crossattention = Attention(c, c.image_hidden_size)
        self.intermediate = nn.Module()
        self.intermediate.dense = Linear(c.hidden_size, c.intermediate_size)
        self.output = nn.Module()
        self.output.dense = Linear(c.intermediate_size, c.hidden_size)
        self.output.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, image: torch.Tensor | None,
                first_only: bool = False) -> torch.Tensor:
        h = self.attention.self_attention(h, mask, first_only)
        if image is not None:
            h = self.crossattention.folded_cross_attention(h, image)
        ffn = self.output.dense(linear_gelu(h, self.intermediate.dense))
        return self.output.LayerNorm(ffn + h)


class BlipTextTower(nn.Module):
    """Unimodal text embeddings (ITC) and image-grounded ITM logits over given image tokens."""

    def __init__(self, c: TextTowerConfig):
        super().__init__()
        self.config = c
        self.text_encoder = nn.Module()
        emb = self.text_encoder.embeddings = nn.Module()
        emb.word_embeddings = Embedding(c.vocab_size, c.hidden_size)
        emb.position_embeddings = Embedding(c.max_positions, c.hidden_size)
        emb.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.text_encoder.encoder = nn.Module()
        self.text_encoder.encoder.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_layers))
        self.text_proj = Linear(c.hidden_size, c.embed_dim)
        self.itm_head = Linear(c.hidden_size, 2)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Take this tower's tensors from a BLIP retrieval state dict; a missing one is an error."""
        load_weights(self, state, "text-side")

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image: torch.Tensor | None) -> torch.Tensor:
        """Hidden states (B, L, H); only position 0 of the last layer, which is all the heads read."""
        emb = self.text_encoder.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(positions))  # (B, L, H)
        # padding keys are masked for every query: (B, 1, 1, L) broadcast over heads and queries
        mask = None if bool(attention_mask.all()) else attention_mask[:, None, None, :].bool()
        layers = self.text_encoder.encoder.layer
        for i, layer in enumerate(layers):
            h = layer(h, mask, image, first_only=i == len(layers) - 1)
        return h  # (B, 1, H) after the last layer

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L) tokens with [CLS] first -> (N, D) normalised ITC embeddings, float32."""
        h = self._encode(input_ids, attention_mask, None)
        return F.normalize(self.text_proj(h[:, 0, :]).float(), dim=-1)

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens with [ENC] first, (B or 1, T, Hv) image tokens -> (B, 2) ITM logits, float32."""
        h = self._encode(input_ids, attention_mask, image.to(self.itm_head.weight.dtype))
        return self.itm_head(h[:, 0, :]).float()
