"""BLIP (ViT + BERT) retrieval checkpoints through transformers' `BlipForImageTextRetrieval`.

The engine calls the submodules itself (`vision_model`, `vision_proj`, `text_encoder`, `text_proj`,
`itm_head`) so that stored vision features are reused: the class's own `forward` always re-runs the
vision tower.

ITM convention: BLIP was trained with an `[ENC]` token replacing `[CLS]` at position 0 of the text that
attends to the image (salesforce/BLIP `blip_retrieval.py`, LAVIS `compute_sim_matrix`). transformers'
`forward` feeds `[CLS]` (transformers issues #22732, #25629). We follow training: `itm_scores` writes
`enc_token_id` at position 0; see `BlipRetrievalModel.enc_token_id`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelLoadError
from .base import ImageEncoding, ModelInfo, Preprocessing, TextEncoding, TextTokens
from .loading import Checkpoint, from_pretrained, revision

log = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 35  # as in BLIP/LAVIS retrieval evaluation
# Modules that a retrieval checkpoint must carry trained weights for.
REQUIRED_MODULES = ("vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head")
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class BlipRetrievalModel:
    """A BLIP retrieval checkpoint on one device and dtype; implements `RetrievalModel`."""

    def __init__(self, model, tokenizer, info: ModelInfo, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        self.dtype = dtype
        self.enc_token_id = _enc_token_id(tokenizer, model.config.text_config)
        pre = info.preprocessing
        # Rescale and normalise in one step, as the image processor does: (x / 255 - mean) / std.
        self._pixel_mean = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0
        self._pixel_std = torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0

    @classmethod
    def load(cls, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> BlipRetrievalModel:
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        model, loading = from_pretrained(checkpoint, BlipForImageTextRetrieval, output_loading_info=True)
        _check_heads_loaded(checkpoint.name, loading)
        tokenizer = from_pretrained(checkpoint, AutoTokenizer)
        preprocessing = _preprocessing(checkpoint)
        config = model.config
        vision = config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + [CLS]
        info = ModelInfo(
            model_id=checkpoint.model_id,
            revision=revision(checkpoint, config),
            family="blip",
            embed_dim=config.image_text_hidden_size,
            vectors_per_image=1,
            feature_tokens=tokens,
            feature_dim=vision.hidden_size,
            preprocessing=preprocessing,
        )
        return cls(model, tokenizer, info, device, dtype)

    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
        return (batch - self._pixel_mean) / self._pixel_std

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor) -> ImageEncoding:
        pixels = pixel_values.to(self.device, self.dtype)
        features = self.model.vision_model(pixel_values=pixels).last_hidden_state  # (B, T, H)
        embeddings = F.normalize(self.model.vision_proj(features[:, 0, :]).float(), dim=-1)
        return ImageEncoding(embeddings=embeddings[:, None, :].cpu(), features=features)

    def tokenize(self, texts: list[str]) -> TextTokens:
        batch = self.tokenizer(texts, padding="longest", truncation=True, max_length=MAX_TEXT_TOKENS,
                               return_tensors="pt")
        return TextTokens(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> TextEncoding:
        tokens = self.tokenize(texts)
        hidden = self.model.text_encoder(
            input_ids=tokens.input_ids.to(self.device),
            attention_mask=tokens.attention_mask.to(self.device),
        ).last_hidden_state  # (N, L, H), no image: the unimodal text encoder
        embeddings = F.normalize(self.model.text_proj(hidden[:, 0, :]).float(), dim=-1)
        return TextEncoding(embeddings=embeddings.cpu(), tokens=tokens)

    @torch.inference_mode()
    def itm_scores(self, tokens: TextTokens, features: torch.Tensor) -> torch.Tensor:
        input_ids = tokens.input_ids.clone()
        input_ids[:, 0] = self.enc_token_id  # BLIP's training convention, see the module docstring
        attention_mask = tokens.attention_mask
        if input_ids.shape[0] == 1 and features.shape[0] > 1:
            input_ids = input_ids.expand(features.shape[0], -1)
            attention_mask = attention_mask.expand(features.shape[0], -1)
        features = features.to(self.device, self.dtype)
        image_mask = torch.ones(features.shape[:2], dtype=torch.long, device=self.device)
        hidden = self.model.text_encoder(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            encoder_hidden_states=features,
            encoder_attention_mask=image_mask,
        ).last_hidden_state  # (N, L, H)
        return self.model.itm_head(hidden[:, 0, :]).float().cpu()  # (N, 2)


def _check_heads_loaded(name: str, loading: dict) -> None:
    """Refuse checkpoints whose retrieval modules would be left at random initialisation."""
    missing = {key.split(".")[0] for key in loading.get("missing_keys", ())}
    mismatched = {key.split(".")[0] for key, *_ in loading.get("mismatched_keys", ())}
    absent = sorted((missing | mismatched) & set(REQUIRED_MODULES))
    if absent:
        raise ModelLoadError(
            f"model {name} has no trained weights for {', '.join(absent)}: it is not an image-text "
            "retrieval checkpoint (captioning and VQA ones are not); use e.g. Salesforce/blip-itm-base-coco")


def _enc_token_id(tokenizer, text_config) -> int:
    """The `[ENC]` id: the tokenizer's own, else the id BLIP's tokenizer gives it (right after `[DEC]`).

    BLIP adds `[DEC]` (the bos token, 30522 in BERT's vocabulary) and then `[ENC]` (30523); the Hugging
    Face conversions keep the embedding rows but not always the token in the tokenizer files.
    """
    enc = tokenizer.convert_tokens_to_ids("[ENC]")
    if enc is not None and enc != tokenizer.unk_token_id:
        return int(enc)
    enc = text_config.bos_token_id + 1
    if enc >= text_config.vocab_size:
        raise ModelLoadError("the checkpoint's tokenizer has no [ENC] token and its vocabulary has no row "
                             "after [DEC] to stand for it; it cannot score image-text matches")
    return int(enc)


def _preprocessing(checkpoint: Checkpoint) -> Preprocessing:
    import transformers

    processor_cls = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
    processor = from_pretrained(checkpoint, processor_cls)
    size = processor.size
    height, width = _get(size, "height"), _get(size, "width")
    resample = _RESAMPLE_NAMES.get(int(processor.resample))
    supported = (processor.do_resize and processor.do_rescale and processor.do_normalize
                 and height and width and resample and abs(processor.rescale_factor - 1 / 255) < 1e-9
                 and not getattr(processor, "do_center_crop", False) and not getattr(processor, "do_pad", False))
    if not supported:
        raise ModelLoadError(f"model {checkpoint.name}: its image processor ({processor.to_dict()}) is not the "
                             "BLIP resize + rescale + normalise that blipsearch implements")
    return Preprocessing(height=int(height), width=int(width), mean=tuple(map(float, processor.image_mean)),
                         std=tuple(map(float, processor.image_std)), resample=resample)


def _get(size, key):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)
