"""One caption per image at index time, from a BLIP captioning checkpoint (`BlipForConditionalGeneration`) or a
BLIP-2 one (`Blip2ForConditionalGeneration`: a Q-Former feeding a language model, as `blipsearch train` exports
after stage 2).

Generation is transformers' own `generate` (beam search with a key/value cache); this module adds what the
indexer needs around it: the checkpoint found and checked as retrieval checkpoints are (loading.py), the
same pixels the retrieval model gets, BLIP's prompt, and failures confined to the image that caused them.

Prompt: BLIP's captioners were fine-tuned on "a picture of " + caption, the prompt masked from the LM loss
(salesforce/BLIP `blip_decoder(prompt='a picture of ')`), and generate after it. BLIP feeds the decoder
`[DEC] prompt`: the tokenised prompt with [CLS] replaced by the bos token [DEC] and its trailing [SEP]
dropped; transformers' `BlipForConditionalGeneration.generate` makes both edits to the `input_ids` it is
given, so we give it `[DEC] prompt [SEP]`. The prompt is then cut off again: we decode only the tokens
after it. The prompt comes from, in order: the `prompt` argument; the checkpoint's config.json
`caption_prompt`, which `training/export.py` writes ("" for a captioner trained without one); else BLIP's
"a picture of ", with which Salesforce's hub captioners were fine-tuned (their configs do not say).

BLIP-2 and InstructBLIP: the language model reads one `<image>` placeholder per query (replaced by the
projected queries), then the prompt as its tokenizer encodes it (as `Blip2Processor` builds it); the prompt is
the config's `caption_prompt`, else none (Salesforce's BLIP-2 captioners caption without one). InstructBLIP's
Q-Former reads the prompt too, as its instruction ("A short image caption:" by default, one of
InstructBLIP's). A decoder-only LM's output repeats its input, which is cut; an encoder-decoder LM's is the
caption alone.

Decoding follows BLIP's caption evaluation (configs/caption_coco.yaml): beam search with 3 beams, lengths
20 and 5. BLIP's lengths count the prompt; ours count new tokens only, so a prompt does not shorten the
caption. Beam search draws nothing at random: the same pixels give the same caption.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import DEFAULT_CAPTIONER
from ..device import select_device, select_dtype
from ..errors import FieldError, ModelLoadError, first_line
from .base import Preprocessing
from .loading import WeightsSpec, from_pretrained, local_directory, read_config, refuse_missing, resolve, revision
from .preprocessing import normalise, read_preprocessing

if TYPE_CHECKING:
    from transformers import BlipForConditionalGeneration, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BLIP_PROMPT = "a picture of "  # salesforce/BLIP blip_decoder(prompt=...), see the module docstring
WEIGHTS = WeightsSpec("BlipForConditionalGeneration", ("vision_model", "text_decoder"),
                      f"it is not a BLIP captioning checkpoint; use e.g. {DEFAULT_CAPTIONER}")
BLIP2_WEIGHTS = WeightsSpec("Blip2ForConditionalGeneration",
                            ("vision_model", "qformer", "language_projection", "language_model"),
                            "it is not a BLIP-2 captioning checkpoint")
INSTRUCTBLIP_WEIGHTS = WeightsSpec("InstructBlipForConditionalGeneration", BLIP2_WEIGHTS.required,
                                   "it is not an InstructBLIP checkpoint")
# model_type -> (weights, default prompt: for InstructBLIP the instruction, which its Q-Former reads too)
_FAMILIES = {"blip": (WEIGHTS, BLIP_PROMPT), "blip-2": (BLIP2_WEIGHTS, ""),
             "instructblip": (INSTRUCTBLIP_WEIGHTS, "A short image caption:")}
# what a failing `generate` raises (torch's errors, out of memory included, are RuntimeErrors)
GENERATION_ERRORS = (RuntimeError, ValueError, IndexError)


@dataclass(frozen=True)
class CaptionerInfo:
    """What an index records about the model that wrote its captions."""

    model_id: str  # hub id or absolute local path
    revision: str  # hub commit hash, or a fingerprint of a local directory (loading.revision)
    preprocessing: Preprocessing  # the pixels `caption` expects
    prompt: str  # the decoder starts after it and it is cut from the caption; "" = unconditional


class Captioner:
    """A BLIP captioning checkpoint on one device and dtype, with its tokenizer and decoding settings."""

    def __init__(self, model: BlipForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, info: CaptionerInfo,
                 device: torch.device, dtype: torch.dtype, decoding: dict[str, Any], qformer_tokenizer=None):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.info = info
        self.device = device
        self.dtype = dtype
        self.decoding = decoding  # keyword arguments of `generate`
        self.blip2 = model.config.model_type in ("blip-2", "instructblip")  # a Q-Former and a language model
        self.prompt_ids = _blip2_prompt_ids(tokenizer, model.config, info.prompt) if self.blip2 else \
            _prompt_ids(tokenizer, model.config.text_config, info.prompt)  # (1, 1 + P + 1)
        # InstructBLIP: the Q-Former reads the instruction (the prompt) too
        self.qformer_inputs = {} if qformer_tokenizer is None else \
            {k: v for k, v in qformer_tokenizer(info.prompt, return_tensors="pt").items() if k != "token_type_ids"}

    @classmethod
    def load(cls, name: str, device: str | torch.device = "auto", precision: str = "auto", *, num_beams: int = 3,
             max_new_tokens: int = 20, min_new_tokens: int = 1, prompt: str | None = None) -> Captioner:
        """A captioner from a hub id or a local directory; `prompt` None takes the checkpoint's (see above)."""
        import transformers

        decoding = _decoding(num_beams, max_new_tokens, min_new_tokens)
        checkpoint = resolve(name)
        directory = local_directory(checkpoint)
        config = read_config(directory, name)
        weights, default_prompt = _FAMILIES[_check_architecture(name, config)]
        torch_device = device if isinstance(device, torch.device) else select_device(device)
        dtype = select_dtype(torch_device, precision)
        model, loading = from_pretrained(directory, name, getattr(transformers, weights.transformers_class),
                                         dtype=dtype, output_loading_info=True)
        missing = {key.split(".")[0] for key in loading.get("missing_keys", ())}
        missing |= {key.split(".")[0] for key, *_ in loading.get("mismatched_keys", ())}
        refuse_missing(name, missing, weights)
        tokenizer = from_pretrained(directory, name, transformers.AutoTokenizer)
        qformer_tokenizer = None
        if weights is INSTRUCTBLIP_WEIGHTS:
            qformer_tokenizer = from_pretrained(directory, name, transformers.InstructBlipProcessor).qformer_tokenizer
        info = CaptionerInfo(
            model_id=checkpoint.model_id, revision=revision(checkpoint, directory),
            preprocessing=read_preprocessing(directory, name, model.config.vision_config.image_size),
            prompt=_prompt(name, config, prompt, default_prompt))
        return cls(model, tokenizer, info, torch_device, dtype, decoding, qformer_tokenizer)

    @torch.inference_mode()
    def caption(self, pixels: list[np.ndarray]) -> list[str | None]:
        """One caption per uint8 (H, W, 3) array already resized to `info.preprocessing`, prompt cut off.

        A batch that fails is captioned again one image at a time, so that one bad image costs only its
        own caption: it gets None, and a warning names the error (the caller names the file).
        """
        if not pixels:
            return []
        _check_pixels(pixels, self.info.preprocessing)
        try:
            return self._generate(pixels)
        except GENERATION_ERRORS as exc:
            if len(pixels) == 1:
                log.warning("an image could not be captioned: %s", first_line(exc))
                return [None]
            log.info("captioning %d images at once failed (%s); captioning them one at a time", len(pixels),
                     first_line(exc))
            return [self.caption([image])[0] for image in pixels]

    def _generate(self, pixels: list[np.ndarray]) -> list[str]:
        pre = self.info.preprocessing
        values = normalise(torch.from_numpy(np.stack(pixels)), pre.mean, pre.std)  # (B, 3, H, W)
        prompt = self.prompt_ids.expand(len(pixels), -1).clone()  # generate writes into it: no shared rows
        extra = {k: v.expand(len(pixels), -1).to(self.device) for k, v in self.qformer_inputs.items()}
        extra = {"qformer_input_ids" if k == "input_ids" else "qformer_attention_mask": v for k, v in extra.items()}
        out = self.model.generate(pixel_values=values.to(self.device, self.dtype), input_ids=prompt.to(self.device),
                                  **extra, **self.decoding)  # BLIP: (B, 1 + P + new): [DEC] prompt caption [SEP]...
        if not self.blip2:
            new = out[:, self.prompt_ids.shape[1] - 1:]
        elif self.model.config.use_decoder_only_language_model:
            new = out[:, self.prompt_ids.shape[1]:]  # after the placeholders and the prompt
        else:
            new = out  # an encoder-decoder LM's output is the decoder's: the caption alone
        captions = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [" ".join(text.split()) for text in captions]


def check_captioner(name: str) -> None:
    """Refuse (`ModelLoadError`) what cannot be a captioner, by its config.json (the weights are not loaded;
    a hub id not in the local cache is fetched whole, as its load would): a run that names one checks it
    before it starts, not at its first new image."""
    _check_architecture(name, read_config(local_directory(resolve(name)), name))


def load_captioner(name: str, device: str | torch.device = "auto", precision: str = "auto",
                   **kwargs: Any) -> Captioner:
    """`Captioner.load`: a BLIP captioning checkpoint (hub id or local directory) ready for `caption`."""
    return Captioner.load(name, device, precision, **kwargs)


def _check_architecture(name: str, config: dict) -> str:
    """BLIP (and BLIP-2) checkpoints of every head share one config type: `architectures` tells a captioner
    from the rest. Returns the model type. (A config without `architectures` is judged by its weights:
    `refuse_missing` after loading.)
    """
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type in _FAMILIES and (not architectures or _FAMILIES[model_type][0].transformers_class in architectures):
        return model_type
    what = f"a {', '.join(architectures)} checkpoint" if architectures else f"of type {model_type!r}"
    raise ModelLoadError(f"model {name} is {what}, not a BLIP or BLIP-2 captioner; pass a "
                         f"{WEIGHTS.transformers_class} checkpoint such as {DEFAULT_CAPTIONER}, a "
                         f"{BLIP2_WEIGHTS.transformers_class} or {INSTRUCTBLIP_WEIGHTS.transformers_class} one, or "
                         "the captioner folder `blipsearch train` exports")


def _prompt(name: str, config: dict, given: str | None, default: str = BLIP_PROMPT) -> str:
    """The argument, else the exported config's `caption_prompt`, else the family's default."""
    prompt = given if given is not None else config.get("caption_prompt", default)
    if not isinstance(prompt, str):
        raise ModelLoadError(f"model {name}: caption_prompt in its config.json is not a string; re-export it")
    return prompt


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, text_config: Any, prompt: str) -> torch.Tensor:
    """(1, 1 + P + 1) `[DEC] prompt [SEP]`, as `generate` wants it (it drops the [SEP]; see the docstring)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        raise FieldError("prompt", f"{prompt!r} has words that the model's tokenizer does not know")
    return torch.tensor([[text_config.bos_token_id, *ids, text_config.sep_token_id]])


def _blip2_prompt_ids(tokenizer: PreTrainedTokenizerBase, config: Any, prompt: str) -> torch.Tensor:
    """(1, Q + P) one `<image>` per query, then the prompt: after the LM's BOS for BLIP-2 with a decoder-only
    LM, else as the tokenizer encodes it (special tokens included), as `Blip2Processor` and
    `InstructBlipProcessor` build them from OPT's and T5's tokenizers (and as training reads them)."""
    if config.image_token_index is None:
        raise ModelLoadError("this BLIP-2 checkpoint has no image_token_index in its config; re-export it with "
                             "`blipsearch train` or a recent transformers")
    if config.use_decoder_only_language_model and config.model_type == "blip-2":
        ids = [config.text_config.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    else:  # an encoder's text, or InstructBLIP's instruction: as the tokenizer encodes it
        ids = tokenizer(prompt)["input_ids"]
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        raise FieldError("prompt", f"{prompt!r} has words that the model's tokenizer does not know")
    return torch.tensor([[config.image_token_index] * config.num_query_tokens + ids])


def _decoding(num_beams: int, max_new_tokens: int, min_new_tokens: int) -> dict[str, Any]:
    if num_beams < 1:
        raise FieldError("num_beams", f"must be at least 1, not {num_beams}")
    if max_new_tokens < 1:
        raise FieldError("max_new_tokens", f"must be at least 1, not {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise FieldError("min_new_tokens", f"must be between 0 and max_new_tokens ({max_new_tokens}), "
                                           f"not {min_new_tokens}")
    return dict(num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False)


def _check_pixels(pixels: list[np.ndarray], pre: Preprocessing) -> None:
    """The indexer resizes; a wrong shape here is the caller's error, not a failed caption."""
    shape = (pre.height, pre.width, 3)
    bad = next((p for p in pixels if p.shape != shape or p.dtype != np.uint8), None)
    if bad is not None:
        raise FieldError("pixels", f"must be uint8 arrays of shape {shape}, not {bad.dtype} {bad.shape}")
