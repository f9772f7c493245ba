"""BLIP-2's image tower (EVA ViT-g/14) as transformers' `Blip2VisionModel` stores it (`vision_model.*`).

Its maths and tensor names are BLIP's ViT body (blip_vision.py `VisionTransformer`: pre-norm blocks, fused
qkv with bias, exact GELU, a final LayerNorm = LAVIS's `ln_vision`), only larger: 39 layers, 1408 wide,
16 heads, patch 14. So the BLIP-2 adapter runs that body as it is; what differs is the head: BLIP projects
[CLS] with `vision_proj`, BLIP-2 has no such layer and hands all T tokens after the final LayerNorm to the
Q-Former. Those tokens are what an index keeps for ITM. This module reads the tower's sizes.
"""

from __future__ import annotations

from .blip_vision import VisionTowerConfig

# transformers' Blip2VisionConfig defaults: hub configs list only what differs (Salesforce/blip2-itm-vit-g
# lists no size at all), and where BLIP's defaults (ViT-B/16 at 384 px) would be wrong.
EVA_VIT_G = {"image_size": 224, "patch_size": 14, "hidden_size": 1408, "num_hidden_layers": 39,
             "num_attention_heads": 16, "intermediate_size": 6144, "layer_norm_eps": 1e-6}


def vision_config(config: dict) -> VisionTowerConfig:
    """From a BLIP-2 `config.json` (as a dict), read as BLIP's vision config over EVA ViT-g's defaults."""
    v = EVA_VIT_G | config.get("vision_config", {})
    if not v.get("qkv_bias", True):
        raise ValueError("a ViT without query/value biases is not BLIP-2's EVA ViT-g")
    if not isinstance(v["image_size"], int) or not isinstance(v["patch_size"], int):
        raise ValueError(f"non-square images or patches ({v['image_size']}, {v['patch_size']}) are not supported")
    return VisionTowerConfig.from_blip_config(config | {"vision_config": v})
