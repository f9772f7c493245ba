"""What a BLIP retrieval checkpoint must hold and what the index records of it, for both of its runtimes (the
torch adapter in blip.py, the numpy text side in blip_numpy.py); no torch here."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelLoadError
from .base import ModelInfo
from .loading import Checkpoint, WeightsSpec, revision
from .preprocessing import read_preprocessing
from .tokenizer import TextTokenizer

# Modules that a retrieval checkpoint must carry trained weights for.
REQUIRED_MODULES = ("vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head")
TEXT_MODULES = ("text_encoder.", "text_proj.", "itm_head.")
VISION_MODULES = ("vision_model.", "vision_proj.")
WEIGHTS = WeightsSpec("BlipForImageTextRetrieval", REQUIRED_MODULES,
                      "it is not an image-text retrieval checkpoint (captioning and VQA ones are not); use e.g. "
                      "Salesforce/blip-itm-base-coco")


def enc_token_id(tokenizer: TextTokenizer, config: dict) -> int:
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


def model_info(checkpoint: Checkpoint, directory: Path, config: dict) -> ModelInfo:
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
        preprocessing=read_preprocessing(directory, checkpoint.name, image_size),
    )
