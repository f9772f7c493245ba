"""BLIP for training, assembled from transformers' BLIP modules so that export is a state-dict mapping.

    vision_model   BlipVisionModel: ViT; last_hidden_state (B, 1 + patches, Hv), [CLS] first
    text_encoder   BlipTextModel with cross-attention layers: unimodal without an image (ITC), image-grounded
                   with one (ITM on [ENC])
    text_decoder   BlipTextLMHeadModel whose `.bert` shares every module with text_encoder except the
                   self-attention block of each layer (BLIP's `tie_encoder_decoder_weights(..., "/attention")`)
    vision_proj, text_proj, itm_head, temp
    *_m            momentum copies of vision_model, vision_proj, text_encoder, text_proj (no gradient)
    image_queue, text_queue, idx_queue   ITC keys from earlier batches, identical on every rank

Attribute names equal `BlipForImageTextRetrieval`'s and `BlipForConditionalGeneration`'s, see `export`.
The losses live in `objectives`; this module only computes features.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, ObjectiveConfig
from .tokenizer import SpecialIds

log = logging.getLogger(__name__)

MOMENTUM_PAIRS = (("vision_model", "vision_model_m"), ("vision_proj", "vision_proj_m"),
                  ("text_encoder", "text_encoder_m"), ("text_proj", "text_proj_m"))


def blip_config(cfg: ModelConfig, ids: SpecialIds):
    """The Hugging Face `BlipConfig` for our sizes and vocabulary."""
    from transformers import BlipConfig

    text = dict(vocab_size=ids.vocab_size, hidden_size=cfg.text_width, intermediate_size=cfg.text_mlp,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                max_position_embeddings=cfg.max_positions, bos_token_id=ids.bos, pad_token_id=ids.pad,
                sep_token_id=ids.sep, eos_token_id=ids.sep,
                hidden_dropout_prob=cfg.text_dropout, attention_probs_dropout_prob=cfg.text_dropout)
    vision = dict(hidden_size=cfg.vision_width, intermediate_size=cfg.vision_mlp,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                  image_size=cfg.image_size, patch_size=cfg.patch_size,
                  # transformers' default (1e-10) assumes pre-trained weights get loaded; from scratch the ViT
                  # would start at zero and its [CLS] would not depend on the image for thousands of steps
                  initializer_range=0.02)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=cfg.embed_dim)


def share_encoder_with_decoder(encoder: nn.Module, decoder: nn.Module) -> None:
    """Make `decoder.bert` use the encoder's embeddings, cross-attention and feed-forward modules.

    Only each layer's `attention` (bidirectional in the encoder, causal in the decoder) stays separate.
    The LM head's weight is tied to the (shared) word embeddings, as in BERT and BLIP.
    """
    decoder.bert.embeddings = encoder.embeddings
    for enc_layer, dec_layer in zip(encoder.encoder.layer, decoder.bert.encoder.layer, strict=True):
        dec_layer.crossattention = enc_layer.crossattention
        dec_layer.intermediate = enc_layer.intermediate
        dec_layer.output = enc_layer.output
    decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight


class BlipPretrainModel(nn.Module):
    """Image and text features for BLIP's ITC, ITM and LM objectives."""

    def __init__(self, config, ids: SpecialIds, objective: ObjectiveConfig, with_decoder: bool):
        super().__init__()
        from transformers import BlipTextLMHeadModel, BlipTextModel, BlipVisionModel

        text, vision = config.text_config, config.vision_config
        self.config, self.ids = config, ids
        self.vision_model = BlipVisionModel(vision)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        self.vision_proj = nn.Linear(vision.hidden_size, config.image_text_hidden_size)
        self.text_proj = nn.Linear(text.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(text.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(float(objective.temperature)))
        self.text_decoder = BlipTextLMHeadModel(text) if with_decoder else None
        if self.text_decoder is not None:
            share_encoder_with_decoder(self.text_encoder, self.text_decoder)
        self.momentum = objective.momentum
        self._make_momentum_copies()
        dim, size = config.image_text_hidden_size, objective.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(size, dim), dim=1))  # (Q, D)
        self.register_buffer("text_queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("idx_queue", torch.full((size,), -100, dtype=torch.long))  # -100: no positive
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _make_momentum_copies(self) -> None:
        for online, momentum in MOMENTUM_PAIRS:
            module = copy.deepcopy(getattr(self, online))
            module.requires_grad_(False)
            setattr(self, momentum, module)

    def momentum_modules(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        for online, momentum in MOMENTUM_PAIRS:
            yield getattr(self, online), getattr(self, momentum)

    # --- features -----------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor, momentum: bool = False):
        """(B, 3, H, W) -> token features (B, T, Hv) and normalised ITC vectors (B, D)."""
        vision, proj = (self.vision_model_m, self.vision_proj_m) if momentum else (self.vision_model, self.vision_proj)
        embeds = vision(pixel_values=pixel_values).last_hidden_state
        return embeds, F.normalize(proj(embeds[:, 0, :]).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, momentum: bool = False):
        """Unimodal text encoder: (B, L) -> hidden (B, L, Ht) and normalised ITC vectors (B, D)."""
        encoder, proj = (self.text_encoder_m, self.text_proj_m) if momentum else (self.text_encoder, self.text_proj)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, F.normalize(proj(hidden[:, 0, :]).float(), dim=-1)

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_embeds: torch.Tensor) -> torch.Tensor:
        """Image-grounded text encoder on [ENC] (replacing [CLS]) -> (N, 2) [no match, match] logits."""
        input_ids = input_ids.clone()
        input_ids[:, 0] = self.ids.enc
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                   encoder_hidden_states=image_embeds,
                                   encoder_attention_mask=image_mask).last_hidden_state
        return self.itm_head(hidden[:, 0, :]).float()

    def lm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  image_embeds: torch.Tensor) -> torch.Tensor:
        """Image-grounded decoder, [DEC] replacing [CLS]: (B, L) -> (B, L, vocab) next-token logits."""
        if self.text_decoder is None:
            raise RuntimeError("this model was built without a decoder (objective.losses has no 'lm')")
        input_ids = input_ids.clone()
        input_ids[:, 0] = self.ids.bos
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        return self.text_decoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=image_mask).logits.float()

    # --- momentum and queues ------------------------------------------------------------------------

    @torch.no_grad()
    def momentum_update(self) -> None:
        for online, momentum in self.momentum_modules():
            for p, p_m in zip(online.parameters(), momentum.parameters(), strict=True):
                p_m.mul_(self.momentum).add_(p.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> None:
        """Write the global batch's momentum features over the oldest queue rows (wrapping around)."""
        size = self.image_queue.shape[0]
        if size == 0:
            return
        rows = (self.queue_ptr + torch.arange(image_feat.shape[0], device=idx.device)) % size
        rows = rows[-size:]  # a batch larger than the queue keeps its last rows
        self.image_queue[rows] = image_feat[-size:].to(self.image_queue.dtype)
        self.text_queue[rows] = text_feat[-size:].to(self.text_queue.dtype)
        self.idx_queue[rows] = idx[-size:]
        self.queue_ptr.fill_(int((self.queue_ptr + image_feat.shape[0]) % size))

    def sync_momentum(self) -> None:
        """Momentum copies := online weights (after loading pre-trained weights into the online modules)."""
        with torch.no_grad():
            for online, momentum in self.momentum_modules():
                momentum.load_state_dict(online.state_dict())


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """(1 + grid * grid, width) 2-D sine-cosine position codes (MAE's `get_2d_sincos_pos_embed`): a quarter
    of the channels are sines and a quarter cosines of the patch's column at geometric frequencies
    1 / 10000^(i / (width / 4)), the other half the same of its row; the [CLS] row is zero."""
    if width % 4:
        raise ValueError(f"sine-cosine position codes need a width divisible by 4, not {width}")
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    codes = []
    for coordinate in (cols.flatten(), rows.flatten()):
        angle = coordinate[:, None] * omega[None, :]
        codes += [angle.sin(), angle.cos()]
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), torch.cat(codes, dim=1)]).float()


def build_model(cfg: ModelConfig, objective: ObjectiveConfig, ids: SpecialIds, config=None) -> BlipPretrainModel:
    """A randomly initialised model; `config` (a BlipConfig) wins over `cfg`'s sizes when given.

    `cfg.vision_position_init == "sincos"` starts the ViT's learned position embedding at 2-D sine-cosine codes.
    With transformers' small random init the ViT's tokens carry almost no position, and a model trained from
    scratch on ITC, ITM and LM never learns where a thing is (a linear probe on the first demo model's patch
    tokens explained none of the patch's column, R² -0.27); from the codes the same training had R² 0.97
    after 1000 steps, and its captioning loss then learned the direction of a relation."""
    config = config if config is not None else blip_config(cfg, ids)
    model = BlipPretrainModel(config, ids, objective, with_decoder="lm" in objective.losses)
    if cfg.vision_position_init == "sincos":
        embeddings = model.vision_model.embeddings
        grid = config.vision_config.image_size // config.vision_config.patch_size
        with torch.no_grad():
            embeddings.position_embedding.copy_(sincos_positions(grid, config.vision_config.hidden_size)[None])
        model.sync_momentum()
    if cfg.freeze_vision:
        model.vision_model.requires_grad_(False)  # out of the optimizer; its momentum copy blends equal weights
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("BLIP with %.1fM trainable parameters (decoder: %s)", count / 1e6, model.text_decoder is not None)
    return model
