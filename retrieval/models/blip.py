"""BLIP (ViT + BERT) retrieval checkpoints, as transformers' `BlipForImageTextRetrieval` stores them.

The engine runs the parts itself, so that stored vision features are reused (the class's own `forward`
re-runs the vision tower for every pair): `BlipVisionTower` (blip_vision.py) for images and
`BlipTextTower` (blip_text.py, with folded cross-attention) for texts and ITM. Both hold the
checkpoint's own tensors under transformers' names and are tested equal to transformers' classes.
Safetensors checkpoints load without importing transformers (a text query reads only the text side);
other weight formats are read through `BlipForImageTextRetrieval.from_pretrained`.

ITM convention: BLIP was trained with an `[ENC]` token replacing `[CLS]` at position 0 of the text that
attends to the image (salesforce/BLIP `blip_retrieval.py`, LAVIS `compute_sim_matrix`). transformers'
`forward` feeds `[CLS]` (transformers issues #22732, #25629). We follow training: `itm_scores` writes
`enc_token_id` at position 0; see `_enc_token_id`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError
from .base import ImageEncoding, ModelInfo, Preprocessing, TextEncoding, TextTokens
from .blip_text import BlipTextTower, TextTowerConfig
from .blip_vision import BlipVisionTower, VisionTowerConfig
from .loading import (
    Checkpoint,
    converted_directory,
    from_pretrained,
    has_safetensors,
    local_directory,
    read_config,
    read_tensors,
    revision,
    save_converted,
)
from .tokenizer import TextTokenizer

log = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 35  # as in BLIP/LAVIS retrieval evaluation
# Modules that a retrieval checkpoint must carry trained weights for.
REQUIRED_MODULES = ("vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head")
TEXT_MODULES = ("text_encoder.", "text_proj.", "itm_head.")
VISION_MODULES = ("vision_model.", "vision_proj.")
# BlipImageProcessor's defaults, for keys a preprocessor_config.json leaves out.
PROCESSOR_DEFAULTS = {
    "do_resize": True, "size": {"height": 384, "width": 384}, "resample": 3, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_center_crop": False, "do_pad": False,
}
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class BlipRetrievalModel:
    """A BLIP retrieval checkpoint on one device and dtype; implements `RetrievalModel`."""

    def __init__(self, text: BlipTextTower, tokenizer: TextTokenizer, enc_token_id: int, info: ModelInfo,
                 device: torch.device, dtype: torch.dtype, vision: BlipVisionTower | None = None):
        self.text = text.to(device=device, dtype=dtype).eval()
        self.vision = None if vision is None else vision.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.enc_token_id = enc_token_id
        self.info = info
        self.device = device
        self.dtype = dtype
        pre = info.preprocessing
        # Rescale and normalise in one step, as the image processor does: (x / 255 - mean) / std.
        self._pixel_mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0
        self._pixel_std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0

    @classmethod
    def load(cls, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype,
             with_vision: bool = True) -> BlipRetrievalModel:
        directory = local_directory(checkpoint)
        config = read_config(directory, checkpoint.name)
        info = _model_info(checkpoint, directory, config)
        state = _read_state(checkpoint.name, directory, info, TEXT_MODULES + (VISION_MODULES if with_vision else ()))
        try:
            text = BlipTextTower(TextTowerConfig.from_blip_config(config))
            vision = BlipVisionTower(VisionTowerConfig.from_blip_config(config)) if with_vision else None
            text.load_weights(state)
            if vision is not None:
                vision.load_weights(state)
        except (KeyError, RuntimeError, ValueError) as exc:  # sizes in config.json and tensors disagree
            raise ModelLoadError(f"model {checkpoint.name} does not fit its config.json: {exc}") from exc
        tokenizer = TextTokenizer.from_directory(directory, MAX_TEXT_TOKENS) or _tokenizer_via_transformers(
            directory, checkpoint.name)
        return cls(text, tokenizer, _enc_token_id(tokenizer, config), info, device, dtype, vision)

    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        return (batch - self._pixel_mean) / self._pixel_std

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> ImageEncoding:
        if self.vision is None:
            raise ModelLoadError("this model was loaded without its vision tower; load it with_vision=True")
        features, embeddings = self.vision(pixel_values.to(self.device, self.dtype))  # (B, T, H), (B, D)
        return ImageEncoding(embeddings=embeddings[:, None, :].cpu(), features=features)

    def tokenize(self, texts: list[str]) -> TextTokens:
        return self.tokenizer(texts)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> TextEncoding:
        tokens = self.tokenize(texts)
        embeddings = self.text.embed_texts(tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device))
        return TextEncoding(embeddings=embeddings.cpu(), tokens=tokens)

    @torch.inference_mode()
    def itm_scores(self, tokens: TextTokens, features: torch.Tensor) -> torch.Tensor:
        input_ids = tokens.input_ids.clone()
        input_ids[:, 0] = self.enc_token_id  # BLIP's training convention, see the module docstring
        attention_mask = tokens.attention_mask
        if input_ids.shape[0] == 1 and features.shape[0] > 1:
            input_ids = input_ids.expand(features.shape[0], -1)
            attention_mask = attention_mask.expand(features.shape[0], -1)
        logits = self.text.itm_logits(input_ids.to(self.device), attention_mask.to(self.device),  # (N, 2)
                                      features.to(self.device, self.dtype))
        return logits.cpu()  # (N, 2)


def _read_state(name: str, directory: Path, info: ModelInfo, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of `modules`: from safetensors (the checkpoint's own, or a converted copy in the user
    cache), else through transformers, which reads any format; that copy is then cached as safetensors."""
    converted = converted_directory(info.model_id, info.revision)
    for weights in (directory, converted):
        if has_safetensors(weights):
            _check_safetensors_heads(weights, name)
            return read_tensors(weights, modules)
    state = _state_via_transformers(directory, name)
    save_converted(converted, state)
    return state


def _state_via_transformers(directory: Path, name: str) -> dict[str, torch.Tensor]:
    """All tensors, read by `BlipForImageTextRetrieval` (any weight format); refuses untrained heads."""
    from transformers import BlipForImageTextRetrieval

    model, loading = from_pretrained(directory, name, BlipForImageTextRetrieval, output_loading_info=True)
    missing = {key.split(".")[0] for key in loading.get("missing_keys", ())}
    missing |= {key.split(".")[0] for key, *_ in loading.get("mismatched_keys", ())}
    _refuse_missing(name, missing)
    return model.state_dict()


def _check_safetensors_heads(directory: Path, name: str) -> None:
    from safetensors import safe_open

    present = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            present |= {key.split(".")[0] for key in f.keys()}  # noqa: SIM118  (safe_open is no mapping)
    _refuse_missing(name, set(REQUIRED_MODULES) - present)


def _refuse_missing(name: str, missing: set[str]) -> None:
    """Refuse checkpoints whose retrieval modules would be left at random initialisation."""
    absent = sorted(missing & set(REQUIRED_MODULES))
    if absent:
        raise ModelLoadError(
            f"model {name} has no trained weights for {', '.join(absent)}: it is not an image-text "
            "retrieval checkpoint (captioning and VQA ones are not); use e.g. Salesforce/blip-itm-base-coco")


def _tokenizer_via_transformers(directory: Path, name: str) -> TextTokenizer:
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(directory, name, AutoTokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(f"model {name}: its tokenizer has no fast (tokenizers) backend")
    return TextTokenizer(backend, MAX_TEXT_TOKENS)


def _enc_token_id(tokenizer: TextTokenizer, config: dict) -> int:
    """The `[ENC]` id: the tokenizer's own, else the id BLIP's tokenizer gives it (right after `[DEC]`).

    BLIP adds `[DEC]` (the bos token, 30522 in BERT's vocabulary) and then `[ENC]` (30523); the Hugging
    Face conversions keep the embedding rows but not always the token in the tokenizer files.
    """
    enc = tokenizer.token_id("[ENC]")
    if enc is not None:
        return int(enc)
    text = config.get("text_config", {})
    enc = text.get("bos_token_id", 30522) + 1
    if enc >= text.get("vocab_size", 30524):
        raise ModelLoadError("the checkpoint's tokenizer has no [ENC] token and its vocabulary has no row "
                             "after [DEC] to stand for it; it cannot score image-text matches")
    return int(enc)


def _model_info(checkpoint: Checkpoint, directory: Path, config: dict) -> ModelInfo:
    vision = config.get("vision_config", {})
    image_size, patch_size = vision.get("image_size", 384), vision.get("patch_size", 16)
    return ModelInfo(
        model_id=checkpoint.model_id,
        revision=revision(checkpoint, directory),
        family="blip",
        embed_dim=config.get("image_text_hidden_size", 256),
        vectors_per_image=1,
        feature_tokens=(image_size // patch_size) ** 2 + 1,  # patches + [CLS]
        feature_dim=vision.get("hidden_size", 768),
        preprocessing=read_preprocessing(directory, checkpoint.name),
    )


def read_preprocessing(directory: Path, name: str) -> Preprocessing:
    """The image processor's settings, read from preprocessor_config.json with BlipImageProcessor's defaults."""
    try:
        stored = json.loads((directory / "preprocessor_config.json").read_text())
    except FileNotFoundError:
        stored = {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read the preprocessor_config.json of model {name}: {exc}") from exc
    p = PROCESSOR_DEFAULTS | stored
    size = p["size"] if isinstance(p["size"], dict) else {"height": p["size"], "width": p["size"]}
    resample = _RESAMPLE_NAMES.get(int(p["resample"]))
    supported = (p["do_resize"] and p["do_rescale"] and p["do_normalize"] and resample
                 and "height" in size and "width" in size and abs(p["rescale_factor"] - 1 / 255) < 1e-9
                 and not p.get("do_center_crop") and not p.get("do_pad"))
    if not supported:
        raise ModelLoadError(f"model {name}: its image processor settings are not the BLIP resize + rescale + "
                             "normalise that blipsearch implements")
    return Preprocessing(height=int(size["height"]), width=int(size["width"]),
                         mean=tuple(map(float, p["image_mean"])), std=tuple(map(float, p["image_std"])),
                         resample=resample)
