"""Between our training model and Hugging Face BLIP checkpoints: both directions are state-dict mappings.

Export writes `BlipForImageTextRetrieval` (what `blipsearch index/query --model PATH` load) and, when the
model has a decoder, `BlipForConditionalGeneration` (the captioner, for CapFilt), each with its
tokenizer and image processor. Import (`init_from`) reads either class back into the online modules.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from blipsearch.retrieval.errors import ModelLoadError
from blipsearch.retrieval.models.base import Preprocessing

from .data import BLIP_MEAN, BLIP_STD

log = logging.getLogger(__name__)

RETRIEVAL_MODULES = ("vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head")
CAPTIONER_MODULES = ("vision_model", "text_decoder")
_CLASSES = {"BlipForImageTextRetrieval": RETRIEVAL_MODULES, "BlipForConditionalGeneration": CAPTIONER_MODULES}


def preprocessing_of(config) -> Preprocessing:
    """What the exported image processor does, for the training data loader: the same numbers."""
    side = config.vision_config.image_size
    return Preprocessing(height=side, width=side, mean=BLIP_MEAN, std=BLIP_STD, resample="bicubic")


def _state(model, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    prefixes = tuple(m + "." for m in modules)
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def _export(model, tokenizer, out: str | Path, class_name: str) -> Path:
    import transformers

    out = Path(out)
    hf = getattr(transformers, class_name)(model.config)
    result = hf.load_state_dict(_state(model, _CLASSES[class_name]), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"export to {class_name} does not map cleanly: missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    hf.save_pretrained(out)
    side = model.config.vision_config.image_size
    images = transformers.BlipImageProcessorPil(size={"height": side, "width": side}, image_mean=BLIP_MEAN,
                                                image_std=BLIP_STD)
    transformers.BlipProcessor(images, tokenizer).save_pretrained(out)  # processor_config.json + tokenizer
    log.info("exported %s to %s", class_name, out)
    return out


def export_retrieval(model, tokenizer, out: str | Path) -> Path:
    """`BlipForImageTextRetrieval` + tokenizer + image processor, loadable by `load_model(out)`."""
    return _export(model, tokenizer, out, "BlipForImageTextRetrieval")


def export_captioner(model, tokenizer, out: str | Path) -> Path:
    """`BlipForConditionalGeneration` + tokenizer + image processor (needs a model with a decoder)."""
    if model.text_decoder is None:
        raise ModelLoadError("this model has no decoder to export as a captioner (train with the lm loss)")
    return _export(model, tokenizer, out, "BlipForConditionalGeneration")


def checkpoint_dir(name: str) -> Path:
    """The local folder of a checkpoint given as a directory or a hub id (cache first, then download)."""
    from blipsearch.retrieval.models.loading import local_directory, resolve

    return local_directory(resolve(name))


def load_pretrained(loader, directory: Path, name: str, require: str | None = None):
    """`loader.from_pretrained(directory)` with one-line errors; refuses a checkpoint whose `require`
    module would be left at random initialisation (a retrieval checkpoint given as a captioner)."""
    from blipsearch.retrieval.models.loading import from_pretrained

    if require is None:
        return from_pretrained(directory, name, loader)
    model, loading = from_pretrained(directory, name, loader, output_loading_info=True)
    if any(key.startswith(require + ".") for key in loading.get("missing_keys", ())):
        raise ModelLoadError(f"model {name} has no trained {require}: it is not a captioning checkpoint")
    return model


def read_hf_checkpoint(name: str):
    """(BlipConfig, state dict, tokenizer) of a Hugging Face BLIP retrieval or captioning checkpoint."""
    import transformers

    directory = checkpoint_dir(name)
    config = load_pretrained(transformers.AutoConfig, directory, name)
    class_name = next((a for a in (config.architectures or ()) if a in _CLASSES), None)
    if config.model_type != "blip" or class_name is None:
        raise ModelLoadError(f"model {name} is not a BLIP retrieval or captioning checkpoint "
                             f"(architectures: {config.architectures})")
    hf = load_pretrained(getattr(transformers, class_name), directory, name)
    tokenizer = load_pretrained(transformers.AutoTokenizer, directory, name)
    return hf.config, hf.state_dict(), tokenizer


def load_hf_weights(model, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy matching weights into the online modules, then the momentum copies; returns modules loaded."""
    ours = model.state_dict()
    usable = {k: v for k, v in state.items() if k in ours and ours[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    model.sync_momentum()
    loaded = sorted({k.split(".")[0] for k in usable})
    untouched = sorted({k.split(".")[0] for k in ours if not k.split(".")[0].endswith("_m")} - set(loaded)
                       - {"temp", "image_queue", "text_queue", "idx_queue", "queue_ptr"})
    log.info("initialised %s from the checkpoint; %s start random", ", ".join(loaded), ", ".join(untouched) or "none")
    return loaded
