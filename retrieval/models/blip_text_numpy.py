"""BLIP's text side in numpy, fp32: the maths of `blip_text.BlipTextTower` (folded cross-attention, the last
layer at position 0 alone), without torch.

A text query on a CPU that computes in fp32 needs nothing else: the ITC text embedding and the ITM re-rank
over stored features. In numpy it spares the query process the import of torch (1.5-2.8 s on the 2-core
AVX2 EPYC we measure on, more than all the rest of a query with the demo model), and its matrix products go
to numpy's BLAS (OpenBLAS in numpy's wheels), which on that CPU ran fp32 GEMM 15-25% faster than torch's
MKL. tests/test_blip_text_numpy.py holds it to the torch tower.

Arrangement, for the BLAS and the caches:
- a linear layer is one GEMM over all rows (`x @ W.T`: BLAS reads the stored (out, in) matrix transposed);
- the cross-attention keeps each candidate's rows in (token, head) order, so the folded queries are written
  and the value projection read per head through strided views, with no transposing copies;
- each candidate's scores are made, softmaxed and mixed while they are in cache (120 x 577 floats for a
  10-token query), instead of one pass of each step over all candidates;
- GELU (exact, erf) runs in row blocks that stay in cache;
- the ITM pass splits its candidates over one thread per core, each calling the BLAS single-threaded
  (threadpoolctl sets that for the pass): numpy's element-wise steps then run on every core too, and each
  GEMM keeps a whole core instead of being cut in two. A 10-token query over 32 candidates, ViT-B/BERT-base
  sizes, on the 2-core AVX2 EPYC: 1.42 -> 1.20 s (medians of 10, alternating in one process).
"""

from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .text_config import TextTowerConfig

_F32 = np.float32
_GELU_ROWS = 32  # rows of the FFN activation per GELU block (32 x 3072 floats: 384 KB, an L2's share)


class NumpyTextTower:
    """ITC text embeddings and ITM logits from a BLIP checkpoint's text-side tensors (numpy float32, keyed
    by transformers' names: `text_encoder.*`, `text_proj.*`, `itm_head.*`)."""

    def __init__(self, config: TextTowerConfig, weights: dict[str, np.ndarray]):
        c = self.config = config
        self.heads, self.head_size = c.num_heads, c.hidden_size // c.num_heads

        def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
            if name not in weights:
                raise KeyError(f"checkpoint lacks text-side tensor {name}")
            array = np.ascontiguousarray(weights[name], dtype=_F32)  # as given (mapped from the file), if it is so
            if array.shape != shape:
                raise ValueError(f"{name} has shape {tuple(array.shape)}, config.json gives {shape}")
            return array

        h, hv, ff, nh, hs = c.hidden_size, c.image_hidden_size, c.intermediate_size, self.heads, self.head_size
        e = "text_encoder.embeddings."
        self.word = take(e + "word_embeddings.weight", (c.vocab_size, h))
        self.position = take(e + "position_embeddings.weight", (c.max_positions, h))
        self.embed_norm = (take(e + "LayerNorm.weight", (h,)), take(e + "LayerNorm.bias", (h,)))
        self.layers = []
        for i in range(c.num_layers):
            p = f"text_encoder.encoder.layer.{i}."

            def lin(name: str, out: int, into: int, p: str = p) -> tuple[np.ndarray, np.ndarray]:
                return take(p + name + ".weight", (out, into)), take(p + name + ".bias", (out,))

            def norm(name: str, p: str = p) -> tuple[np.ndarray, np.ndarray]:
                return take(p + name + ".weight", (h,)), take(p + name + ".bias", (h,))

            (wq, bq), (wk, bk), (wv, bv) = (lin(f"attention.self.{n}", h, h) for n in ("query", "key", "value"))
            cross_k, _ = lin("crossattention.self.key", h, hv)  # its bias adds a constant per query: softmax drops it
            cross_v, cross_bv = lin("crossattention.self.value", h, hv)
            self.layers.append({  # the weights as read (views of the mapped file): no copies
                "q": (wq, bq), "k": (wk, bk), "v": (wv, bv),
                "self_out": lin("attention.output.dense", h, h), "self_norm": norm("attention.output.LayerNorm"),
                "cross_q": lin("crossattention.self.query", h, h),
                "cross_k": cross_k.reshape(nh, hs, hv),  # (nh, hs, Hv)
                "cross_v": cross_v.reshape(nh, hs, hv), "cross_bv": cross_bv,
                "cross_out": lin("crossattention.output.dense", h, h),
                "cross_norm": norm("crossattention.output.LayerNorm"),
                "ffn_in": lin("intermediate.dense", ff, h), "ffn_out": lin("output.dense", h, ff),
                "ffn_norm": norm("output.LayerNorm"),
            })
        self.text_proj = (take("text_proj.weight", (c.embed_dim, h)), take("text_proj.bias", (c.embed_dim,)))
        self.itm_head = (take("itm_head.weight", (2, h)), take("itm_head.bias", (2,)))

    # ---- the two entry points ----------------------------------------------------------------------

    def embed_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(N, L) tokens with [CLS] first -> (N, D) normalised ITC embeddings, float32."""
        h = self._encode(input_ids, attention_mask, None)
        v = _linear(h, *self.text_proj)
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), _F32(1e-12))

    def itm_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, image: np.ndarray) -> np.ndarray:
        """(N, L) tokens with [ENC] first; (B, T, Hv) image tokens -> (max(N, B), 2) ITM logits, float32.

        N is B (text i against image i), 1 (one text against every image: its self-attention before the
        first cross-attention is computed once), or any count against B = 1 (one image against every text)."""
        image = np.ascontiguousarray(image, dtype=_F32)
        if image.ndim != 3 or image.shape[-1] != self.config.image_hidden_size:
            raise ValueError(f"image features of shape {image.shape}; expected (B, T, "
                             f"{self.config.image_hidden_size})")
        if image.shape[0] == 1 < input_ids.shape[0]:  # the one image for every text row: a view, no copies
            image = np.broadcast_to(image, (input_ids.shape[0], *image.shape[1:]))
        if input_ids.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"{input_ids.shape[0]} texts for {image.shape[0]} images")
        parts = np.array_split(np.arange(image.shape[0]), threads_for(image.shape[0]))
        if len(parts) == 1:
            return _linear(self._encode(input_ids, attention_mask, image), *self.itm_head)

        def part(rows: np.ndarray) -> np.ndarray:
            span = slice(int(rows[0]), int(rows[-1]) + 1)
            ids, mask = (input_ids, attention_mask) if input_ids.shape[0] == 1 else (input_ids[span],
                                                                                    attention_mask[span])
            return _linear(self._encode(ids, mask, image[span]), *self.itm_head)

        with _one_blas_thread_per_call():
            return np.concatenate(list(_pool().map(part, parts)))

    # ---- the layers ----------------------------------------------------------------------------------

    def _encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, image: np.ndarray | None) -> np.ndarray:
        """(rows, H) states at position 0 after the last layer; rows = images (ITM) or texts (ITC)."""
        n, length = input_ids.shape
        if length > self.config.max_positions:
            raise ValueError(f"{length} tokens; the model has {self.config.max_positions} positions")
        h = self.word[input_ids] + self.position[:length]  # (N, L, H)
        h = _layer_norm(h.reshape(n * length, -1), *self.embed_norm, self.config.layer_norm_eps)
        # padding keys are masked for every query: (N, 1, 1, L) added to the scores
        mask = np.asarray(attention_mask)
        bias = None if mask.all() else np.where(mask[:, None, None, :] != 0, _F32(0), _F32(-np.inf))
        batch = n if image is None else image.shape[0]
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            h = self._self_attention(layer, h, n, length, bias, last)  # (n * L, H), or (n, H) if last
            if image is not None:
                if n < batch:  # one text for every image: the text rows repeat from here on
                    h = np.repeat(h.reshape(n, -1, h.shape[-1]), batch, axis=0).reshape(-1, h.shape[-1])
                    bias = None if bias is None else np.repeat(bias, batch, axis=0)
                    n = batch
                h = self._cross_attention(layer, h, image, 1 if last else length)
            h = self._feed_forward(layer, h)
        return h  # (rows, H)

    def _self_attention(self, layer: dict, h: np.ndarray, n: int, length: int, bias: np.ndarray | None,
                        first_only: bool) -> np.ndarray:
        nh, hs = self.heads, self.head_size
        d = h.shape[-1]
        # only position 0 goes on after the last layer: its query alone, every position's key and value
        rows = np.ascontiguousarray(h.reshape(n, length, d)[:, 0]) if first_only else h
        q = _linear(rows, *layer["q"]).reshape(n, -1, nh, hs)
        k = _linear(h, *layer["k"]).reshape(n, length, nh, hs)
        v = _linear(h, *layer["v"]).reshape(n, length, nh, hs)
        scores = np.matmul(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1))  # (n, nh, Lq, L)
        scores *= _F32(1 / math.sqrt(hs))
        if bias is not None:
            scores += bias
        _softmax(scores)
        context = np.matmul(scores, v.transpose(0, 2, 1, 3))  # (n, nh, Lq, hs)
        context = context.transpose(0, 2, 1, 3).reshape(rows.shape[0], d)
        out = _linear(context, *layer["self_out"])
        out += rows
        return _layer_norm(out, *layer["self_norm"], self.config.layer_norm_eps)

    def _cross_attention(self, layer: dict, h: np.ndarray, image: np.ndarray, length: int) -> np.ndarray:
        """Folded cross-attention (see blip_text.py): h (B * L, H) -> (B * L, H)."""
        nh, hs = self.heads, self.head_size
        batch, tokens, hv = image.shape
        rows = h.shape[0]
        q = _linear(h, *layer["cross_q"])
        q *= _F32(1 / math.sqrt(hs))  # the scores' scale, on the queries (fewer rows than the key weights)
        q = q.reshape(rows, nh, hs)
        # queries into image space, rows in (candidate, token, head) order: (B * L, nh, Hv)
        q_x = np.empty((rows, nh, hv), _F32)
        for head in range(nh):
            np.matmul(q[:, head], layer["cross_k"][head], out=q_x[:, head])
        q_x = q_x.reshape(batch, length * nh, hv)
        mixed = np.empty_like(q_x)  # attention-weighted image tokens, same rows
        scores = np.empty((length * nh, tokens), _F32)
        for b in range(batch):  # each candidate's scores stay in cache from product to mixing
            np.matmul(q_x[b], image[b].T, out=scores)
            _softmax(scores)
            np.matmul(scores, image[b], out=mixed[b])
        # ... and back through the value projection, per head: (B * L, Hv) @ (Hv, hs) into (B * L, nh, hs)
        mixed = mixed.reshape(rows, nh, hv)
        context = np.empty((rows, nh, hs), _F32)
        for head in range(nh):
            np.matmul(mixed[:, head], layer["cross_v"][head].T, out=context[:, head])
        context = context.reshape(rows, nh * hs)
        context += layer["cross_bv"]
        out = _linear(context, *layer["cross_out"])
        out += h
        return _layer_norm(out, *layer["cross_norm"], self.config.layer_norm_eps)

    def _feed_forward(self, layer: dict, h: np.ndarray) -> np.ndarray:
        inner = _linear(h, *layer["ffn_in"])
        for start in range(0, inner.shape[0], _GELU_ROWS):
            _gelu(inner[start:start + _GELU_ROWS])
        out = _linear(inner, *layer["ffn_out"])
        out += h
        return _layer_norm(out, *layer["ffn_norm"], self.config.layer_norm_eps)


def threads_for(candidates: int) -> int:
    """How many threads an ITM pass over `candidates` images splits into (each runs the first layer's
    self-attention of a single query text once)."""
    return max(1, min(_cores(), candidates))


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_cores(), thread_name_prefix="itm")


_BLAS_LOCK = threading.Lock()  # the BLAS thread setting is process-wide: one pass changes it at a time


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads: its pool and lock start afresh (the parent's pool
    would wait for workers that do not exist)."""
    global _BLAS_LOCK
    _pool.cache_clear()
    _BLAS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _one_blas_thread_per_call:
    """While a split pass runs, every BLAS library that the process had loaded at its first pass (numpy's,
    and any other) computes each call on the calling thread alone; restored afterwards. Process-wide: other
    threads' BLAS calls run single-threaded for that time too."""

    def __enter__(self) -> None:
        _BLAS_LOCK.acquire()
        try:
            self._limit = _blas_controller().limit(limits=1, user_api="blas")
        except BaseException:
            _BLAS_LOCK.release()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self._limit.restore_original_limits()
        finally:
            _BLAS_LOCK.release()


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # finds the loaded BLAS libraries once (a scan of the process's libraries)


def _linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    out = x @ weight.T
    out += bias
    return out


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """Over the last axis, in place on `x` (a fresh array)."""
    x -= x.mean(axis=-1, keepdims=True)
    variance = np.einsum("...i,...i->...", x, x)[..., None]
    variance *= _F32(1 / x.shape[-1])
    variance += _F32(eps)
    np.sqrt(variance, out=variance)
    x /= variance
    x *= weight
    x += bias
    return x


def _softmax(x: np.ndarray) -> None:
    """Over the last axis, in place."""
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)


# erf(z) = 1 - t (a1 + t (a2 + ... t a5)) exp(-z^2), t = 1 / (1 + p z), z >= 0: Abramowitz & Stegun 7.1.26,
# absolute error under 1.5e-7 (fp32 rounds at 6e-8 near 1); numpy has no erf of its own
_ERF_P = _F32(0.3275911)
_ERF_A = tuple(_F32(a) for a in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592))


def _gelu(x: np.ndarray) -> None:
    """Exact GELU, x (1 + erf(x / sqrt 2)) / 2, in place (BLIP's `gelu`). x erf(x / sqrt 2) is even, so
    gelu = (x + |x| (1 - r)) / 2 with r = 1 - erf(|x| / sqrt 2): no branch on the sign (a masked pass took
    6.7 ms over a 320 x 3072 activation; this whole GELU, in 32-row blocks, 4.4 ms)."""
    a = np.abs(x)
    z = a * _F32(1 / math.sqrt(2))
    t = z * _ERF_P
    t += _F32(1)
    np.reciprocal(t, out=t)
    r = t * _ERF_A[0]  # the polynomial, by Horner's rule
    for coefficient in _ERF_A[1:]:
        r += coefficient
        r *= t
    np.square(z, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    r *= z  # 1 - erf(|x| / sqrt 2)
    np.subtract(_F32(1), r, out=r)
    r *= a
    x += r
    x *= _F32(0.5)
