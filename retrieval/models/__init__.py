"""Model adapters. `load_model` picks the adapter from the checkpoint's `model_type`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ModelLoadError
from .base import ImageEncoding, ModelInfo, Preprocessing, RetrievalModel, TextEncoding, TextTokens
from .loading import Checkpoint, resolve

if TYPE_CHECKING:
    import torch

from .. import DEFAULT_MODEL

__all__ = [
    "DEFAULT_MODEL",
    "Checkpoint",
    "ImageEncoding",
    "ModelInfo",
    "Preprocessing",
    "RetrievalModel",
    "TextEncoding",
    "TextTokens",
    "load_model",
    "resolve",
]


def load_model(name: str, device: str | torch.device = "auto", precision: str = "auto",
               with_vision: bool = True, one_shot: bool = False) -> RetrievalModel:
    """Load a retrieval checkpoint (hub id or local directory) ready for `encode_*` and `itm_scores`.

    `with_vision=False` loads only what a text query needs (faster start, less memory). For a BLIP checkpoint
    that would compute in fp32 on the CPU, that is the numpy text side (blip_numpy.py), loaded without torch;
    pass a `torch.device` to have the torch adapter in any case. `one_shot`: the process answers a query or a
    few and exits; auto precision then takes that side on x86 CPUs with bf16 units too, as it starts faster
    (`device.numpy_text_side`). `precision="int8"`: fp32 with the image tower's linear layers in int8, checked
    against fp32 on the first batch (models/int8.py; CPU only).
    """
    from ..device import numpy_text_side, select_device, select_dtype
    from .loading import local_directory, read_config

    families = ("blip", "blip-2")
    checkpoint = resolve(name)
    model_type = read_config(local_directory(checkpoint), name).get("model_type")
    if model_type not in families:
        raise ModelLoadError(f"model {name} is of type {model_type!r}; blipsearch loads "
                             f"{', '.join(families)} retrieval checkpoints")
    if model_type == "blip" and not with_vision and isinstance(device, str) and \
            numpy_text_side(device, precision, one_shot):
        from .blip_numpy import BlipNumpyTextModel

        model = BlipNumpyTextModel.load(checkpoint)
        if model is not None:
            return model
    from .blip import BlipRetrievalModel
    from .blip2 import Blip2RetrievalModel

    adapter = {"blip": BlipRetrievalModel, "blip-2": Blip2RetrievalModel}[model_type]
    torch_device = device if not isinstance(device, str) else select_device(device)
    return adapter.load(checkpoint, torch_device, select_dtype(torch_device, precision), with_vision=with_vision,
                        int8=precision == "int8")
