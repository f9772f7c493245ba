"""BLIP-2's frozen image encoder: transformers' `Blip2VisionModel`, loaded from a BLIP or a BLIP-2 checkpoint.

BLIP's ViT (`BlipVisionModel`) and BLIP-2's (`Blip2VisionModel`) are the same network under the same tensor
names: patch/class/position embeddings, pre-norm blocks with one fused `qkv` (bias included: BLIP-2 keeps a
key bias slot, zero in EVA ViT-g and harmless where a BLIP ViT has one, since a key bias adds the same number
to every score of a query), GELU MLPs, and a final `post_layernorm` (LAVIS's `ln_vision` in BLIP-2). Neither
has a pre-LayerNorm (CLIP's `pre_layrnorm`). So a BLIP ViT's `vision_model.*` tensors load into a
`Blip2VisionModel` one to one, and the export's `vision_config` describes that ViT (tested equal to
`BlipVisionModel`). The Q-Former reads every token after `post_layernorm`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from blipsearch.retrieval.errors import ModelLoadError
from blipsearch.retrieval.models.loading import has_safetensors, read_tensors

from .config import ModelConfig
from .export import checkpoint_dir, load_pretrained

log = logging.getLogger(__name__)

# the Blip2VisionConfig fields a BLIP or BLIP-2 vision config holds
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")


def random_vision_config(cfg: ModelConfig):
    """A ViT of the configured sizes with usable random weights (transformers' default std is 1e-10)."""
    from transformers import Blip2VisionConfig

    return Blip2VisionConfig(hidden_size=cfg.vision_width, intermediate_size=cfg.vision_mlp,
                             num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                             image_size=cfg.image_size, patch_size=cfg.patch_size, initializer_range=0.02)


def read_vision_tower(name: str):
    """(Blip2VisionConfig, `vision_model.*` tensors without the prefix) of a BLIP or BLIP-2 checkpoint."""
    import transformers

    directory = checkpoint_dir(name)
    config = load_pretrained(transformers.AutoConfig, directory, name)
    if config.model_type not in ("blip", "blip-2"):
        raise ModelLoadError(f"model {name} is a {config.model_type!r} checkpoint; the image encoder comes "
                             "from a BLIP or BLIP-2 one")
    vision = config.vision_config.to_dict()
    if not vision.get("qkv_bias", True):
        raise ModelLoadError(f"model {name}: a ViT without query/value biases does not map onto Blip2VisionModel")
    vision_config = transformers.Blip2VisionConfig(**{k: vision[k] for k in VISION_FIELDS if k in vision})
    if has_safetensors(directory):  # only the ViT's tensors: a BLIP-2 checkpoint may carry a 7B LLM beside it
        state = read_tensors(directory, name, ("vision_model.",))
    else:
        model = load_pretrained(getattr(transformers, (config.architectures or ["BlipModel"])[0]), directory, name)
        state = {k: v for k, v in model.state_dict().items() if k.startswith("vision_model.")}
    if not state:
        raise ModelLoadError(f"model {name} has no vision_model weights")
    return vision_config, {k.removeprefix("vision_model."): v.float() for k, v in state.items()}


def frozen_vision_model(vision_config, state: dict[str, torch.Tensor] | None, train_norm: bool = False) -> nn.Module:
    """A `Blip2VisionModel` with `state` loaded (None: random), every parameter frozen but, with
    `train_norm`, the final LayerNorm."""
    from transformers import Blip2VisionModel

    model = Blip2VisionModel(vision_config)
    if state is not None:
        model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    model.post_layernorm.requires_grad_(train_norm)
    return model.eval()


def image_tokens(vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, T, Hv) tokens after the final LayerNorm. The ViT body runs without autograd; the
    final LayerNorm too unless it trains."""
    with torch.no_grad():
        hidden = vision_model.embeddings(pixel_values)
        hidden = vision_model.encoder(inputs_embeds=hidden).last_hidden_state
    norm = vision_model.post_layernorm
    with torch.set_grad_enabled(torch.is_grad_enabled() and norm.weight.requires_grad):
        return norm(hidden)
