"""A checkpoint's image-processor settings, for every model family whose processor is BLIP's.

transformers stores them in one of two layouts, and we read them as `AutoImageProcessor` does:

- `processor_config.json` with the settings nested under "image_processor": what
  `BlipProcessor(image_processor, tokenizer).save_pretrained` writes in transformers 5;
- `preprocessor_config.json` holding the settings alone: what an image processor saved on its own writes,
  and what older hub checkpoints (Salesforce/blip-itm-base-coco) carry.

Rule: the nested settings win when `processor_config.json` has them, else `preprocessor_config.json`,
else none. Keys left out take `BlipImageProcessor`'s defaults, except the size, which defaults to the
vision tower's `image_size`; a size that disagrees with the vision tower is refused, since the tower's
position embeddings fit one size only.

`normalise` is the processor's last step, rescale + normalise, for every adapter (and training).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError
from .base import Preprocessing

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# BlipImageProcessor's defaults, for keys the stored settings leave out ("size" comes from the vision config).
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, as BLIP's and BLIP-2's image processors
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_DEFAULTS = {
    "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": list(BLIP_MEAN), "image_std": list(BLIP_STD),
    "do_center_crop": False, "do_pad": False,
}
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
NESTED_FILE = "processor_config.json"
FLAT_FILE = "preprocessor_config.json"


def read_preprocessing(directory: Path, name: str, image_size: int) -> Preprocessing:
    """The settings of model `name` in `directory`, checked against its vision tower's `image_size`."""
    source, stored = _stored_settings(directory, name)
    try:
        pre = _preprocessing(PROCESSOR_DEFAULTS | {"size": image_size} | stored)
    except (KeyError, TypeError, ValueError) as exc:  # a value of the wrong type or shape
        raise ModelLoadError(f"model {name}: cannot read the image processor settings in {source} ({exc!r}); "
                             "re-export the checkpoint or fix that file") from exc
    if pre is None:
        raise ModelLoadError(f"model {name}: its image processor settings in {source} are not the BLIP resize + "
                             "rescale + normalise that blipsearch implements")
    if (pre.height, pre.width) != (image_size, image_size):
        raise ModelLoadError(
            f"model {name}: its image processor ({source}) resizes to {pre.height}x{pre.width} px but its vision "
            f"config has image_size {image_size}; set the processor's size to {image_size} or re-export the model")
    return pre


def _stored_settings(directory: Path, name: str) -> tuple[str, dict[str, Any]]:
    """(file the settings came from, the settings): the nested ones first, as transformers reads them."""
    nested = _read_json(directory / NESTED_FILE, name).get("image_processor")
    if nested is not None:
        if not isinstance(nested, dict):
            raise ModelLoadError(f"model {name}: \"image_processor\" in its {NESTED_FILE} is not an object; "
                                 "re-export the checkpoint")
        return NESTED_FILE, nested
    flat = _read_json(directory / FLAT_FILE, name)
    if flat:
        return FLAT_FILE, flat
    log.info("model %s stores no image processor settings; using BLIP's defaults", name)
    return "BLIP's default settings", {}


def _read_json(path: Path, name: str) -> dict[str, Any]:
    """A JSON object, or {} when the file is absent."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise ModelLoadError(f"model {name}: cannot read its {path.name} ({exc}); download the model again or "
                             "re-export it") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"model {name}: its {path.name} is not a JSON object; download the model again or "
                             "re-export it")
    return value


def _preprocessing(p: dict[str, Any]) -> Preprocessing | None:
    """Our `Preprocessing` for BLIP-style settings `p`, or None where the processor does something else."""
    size = p["size"] if isinstance(p["size"], dict) else {"height": p["size"], "width": p["size"]}
    resample = _RESAMPLE_NAMES.get(int(p["resample"]))
    supported = (p["do_resize"] and p["do_rescale"] and p["do_normalize"] and resample
                 and "height" in size and "width" in size and abs(p["rescale_factor"] - 1 / 255) < 1e-9
                 and not p.get("do_center_crop") and not p.get("do_pad"))
    if not supported:
        return None
    mean, std = tuple(map(float, p["image_mean"])), tuple(map(float, p["image_std"]))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"image_mean and image_std need 3 values, not {len(mean)} and {len(std)}")
    return Preprocessing(height=int(size["height"]), width=int(size["width"]), mean=mean, std=std,
                         resample=resample)


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 RGB (B, H, W, 3) -> float32 (B, 3, H, W): (x / 255 - mean) / std in one step, as the processor."""
    import torch

    scaled_mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    scaled_std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return (pixels.permute(0, 3, 1, 2).float() - scaled_mean) / scaled_std
