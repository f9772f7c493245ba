"""Between our training models and Hugging Face BLIP / BLIP-2 checkpoints: both directions are state-dict mappings.

Export writes `BlipForImageTextRetrieval` (what `blipsearch index/query --model PATH` load) and, when the
model has a decoder, `BlipForConditionalGeneration` (the captioner, for CapFilt), each with its
tokenizer and image processor. Import (`init_from`) reads either class back into the online modules.
BLIP-2 stage 1 exports `Blip2ForImageTextRetrieval` + `Blip2Processor` (the ITG head has no transformers
class to go to) and starts from one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from blipsearch.retrieval.errors import ModelLoadError
from blipsearch.retrieval.models.base import Preprocessing
from blipsearch.retrieval.models.preprocessing import BLIP_MEAN, BLIP_STD

log = logging.getLogger(__name__)

RETRIEVAL_MODULES = ("vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head")
CAPTIONER_MODULES = ("vision_model", "text_decoder")
BLIP2_RETRIEVAL_MODULES = ("vision_model", "query_tokens", "embeddings", "qformer", "vision_projection",
                           "text_projection", "itm_head")
_CLASSES = {"BlipForImageTextRetrieval": RETRIEVAL_MODULES, "BlipForConditionalGeneration": CAPTIONER_MODULES,
            "Blip2ForImageTextRetrieval": BLIP2_RETRIEVAL_MODULES}
_PROCESSORS = {"BlipForImageTextRetrieval": "BlipProcessor", "BlipForConditionalGeneration": "BlipProcessor",
               "Blip2ForImageTextRetrieval": "Blip2Processor"}
# what training can start from (`init_from`), by model_type
_STARTS = {"blip": (("BlipForImageTextRetrieval", "BlipForConditionalGeneration"), "BLIP retrieval or captioning"),
           "blip-2": (("Blip2ForImageTextRetrieval",), "BLIP-2 retrieval")}


def preprocessing_of(config) -> Preprocessing:
    """What the exported image processor does, for the training data loader: the same numbers."""
    side = config.vision_config.image_size
    return Preprocessing(height=side, width=side, mean=BLIP_MEAN, std=BLIP_STD, resample="bicubic")


def _state(model, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    prefixes = tuple(m + "." for m in modules)
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()
            if k.startswith(prefixes) or k in modules}  # a bare name: a parameter (BLIP-2's query_tokens)


def _export(model, tokenizer, out: str | Path, class_name: str, config=None) -> Path:
    import transformers

    out = Path(out)
    hf = getattr(transformers, class_name)(config if config is not None else model.config)
    result = hf.load_state_dict(_state(model, _CLASSES[class_name]), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"export to {class_name} does not map cleanly: missing {result.missing_keys[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    hf.save_pretrained(out)
    side = model.config.vision_config.image_size
    images = transformers.BlipImageProcessorPil(size={"height": side, "width": side}, image_mean=BLIP_MEAN,
                                                image_std=BLIP_STD)
    processor = getattr(transformers, _PROCESSORS[class_name])
    processor(images, tokenizer).save_pretrained(out)  # processor_config.json (image processor nested) + tokenizer
    log.info("exported %s to %s", class_name, out)
    return out


def export_retrieval(model, tokenizer, out: str | Path) -> Path:
    """`BlipForImageTextRetrieval` + tokenizer + image processor, loadable by `load_model(out)`."""
    return _export(model, tokenizer, out, "BlipForImageTextRetrieval")


def export_captioner(model, tokenizer, out: str | Path) -> Path:
    """`BlipForConditionalGeneration` + tokenizer + image processor (needs a model with a decoder)."""
    import copy

    if model.text_decoder is None:
        raise ModelLoadError("this model has no decoder to export as a captioner (train with the lm loss)")
    config = copy.deepcopy(model.config)
    config.caption_prompt = tokenizer.decode(list(model.ids.prompt))  # what generation starts after ("" none)
    return _export(model, tokenizer, out, "BlipForConditionalGeneration", config)


def export_blip2_retrieval(model, tokenizer, out: str | Path) -> Path:
    """`Blip2ForImageTextRetrieval` + `Blip2Processor` (tokenizer with [DEC]), loadable by `load_model(out)`.

    No `<image>` placeholders: the processor gets no `num_query_tokens` and the config no `image_token_index`,
    so transformers' processor and model agree that the text starts at [CLS]."""
    import copy

    config = copy.deepcopy(model.config)
    config.image_token_index = None
    return _export(model, tokenizer, out, "Blip2ForImageTextRetrieval", config)


def readable(folder: Path) -> Path:
    """The folder's files with the permissions the user's umask gives any new file: safetensors writes its
    weights as 0600, so a server run by another user could not read an exported model."""
    mask = _umask()
    for file in Path(folder).rglob("*"):
        if file.is_file() and not file.is_symlink():
            os.chmod(file, 0o666 & ~mask)
    return Path(folder)


def _umask() -> int:
    """The process's umask, read where Linux shows it (setting it to read it back races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def read_hf_checkpoint(name: str, model_type: str = "blip"):
    """(config, state dict, tokenizer) of a Hugging Face checkpoint that training starts from: BLIP retrieval
    or captioning (`BlipConfig`), or BLIP-2 retrieval (`Blip2Config`)."""
    import transformers

    directory = checkpoint_dir(name)
    config = load_pretrained(transformers.AutoConfig, directory, name)
    classes, kind = _STARTS[model_type]
    class_name = next((a for a in (config.architectures or ()) if a in classes), None)
    if config.model_type != model_type or class_name is None:
        raise ModelLoadError(f"model {name} is not a {kind} checkpoint (architectures: {config.architectures})")
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


def load_blip2_weights(model, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy a `Blip2ForImageTextRetrieval` state dict (ViT, Q-Former, heads) into the training model."""
    ours = model.state_dict()
    usable = {k: v for k, v in state.items() if k in ours and ours[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    loaded = sorted({k.split(".")[0] for k in usable})
    log.info("initialised %s from the checkpoint", ", ".join(loaded))
    return loaded
