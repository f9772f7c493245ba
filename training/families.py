"""What the loop needs of each model family, so that it never asks which one runs.

A family builds its training model (random, or shaped by the Hugging Face config that `init_from` read),
reads the checkpoints it can start from, loads their weights, and exports what the engine loads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blipsearch.retrieval.errors import InvalidInputError

from .blip2 import build_blip2_model
from .config import TrainConfig
from .export import (
    export_blip2_retrieval,
    export_captioner,
    export_retrieval,
    load_blip2_weights,
    load_hf_weights,
    read_hf_checkpoint,
)
from .model import build_model
from .tokenizer import special_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    build: Callable[..., nn.Module] | None  # (cfg, tokenizer, hf config or None) -> model
    read_checkpoint: Callable[[str], tuple] | None  # init_from -> (hf config, state dict, tokenizer)
    load_weights: Callable[[nn.Module, dict], list[str]] | None  # (model, state dict) -> modules loaded
    export: Callable[..., list[Path]]  # (model, tokenizer, out folder, captioner: bool) -> folders written
    # a family that starts from more than one checkpoint builds model and tokenizer itself:
    # (cfg, the training texts (none when exporting), the run folder, is_main) -> (model, tokenizer)
    prepare: Callable[..., tuple[nn.Module, Any]] | None = None  # (cfg, texts, output, is_main, resumed_run=)
    captioner_only: bool = False  # exports a captioner and nothing else (an LM behind the Q-Former: no ITC/ITM)


def _build_blip(cfg: TrainConfig, tokenizer, config=None) -> nn.Module:
    vocab = config.text_config.vocab_size if config is not None else None
    return build_model(cfg.model, cfg.objective, special_ids(tokenizer, vocab, cfg.objective.caption_prompt),
                       config=config)


def _export_blip(model, tokenizer, out: Path, captioner: bool = True) -> list[Path]:
    written = [export_retrieval(model, tokenizer, out / "retrieval")]
    if captioner and model.text_decoder is not None:
        written.append(export_captioner(model, tokenizer, out / "captioner"))
    return written


def _build_blip2(cfg: TrainConfig, tokenizer, config=None) -> nn.Module:
    vocab = config.qformer_config.vocab_size if config is not None else None
    return build_blip2_model(cfg.model, cfg.objective.temperature, "itg" in cfg.objective.losses,
                             special_ids(tokenizer, vocab), config=config, tokenizer=tokenizer)


def _export_blip2(model, tokenizer, out: Path, captioner: bool = True) -> list[Path]:
    """Stage 1 has no captioner to export: its ITG head has no transformers class (stage 2 adds an LLM)."""
    return [export_blip2_retrieval(model, tokenizer, out / "retrieval")]


def _prepare_blip2_lm(cfg: TrainConfig, texts: list[str] = (), output: Path | None = None, is_main: bool = True,
                      instruct: bool = False, resumed_run: Path | None = None):
    """Stage 2 (or InstructBLIP): the stage-1 checkpoint (`init_from`: ViT, queries, Q-Former and its tokenizer),
    the LM (decoder-only or encoder-decoder) and its tokenizer (`language_model`)."""
    import transformers

    from .blip2_lm import add_image_token, build_blip2_lm
    from .export import checkpoint_dir, load_pretrained

    config, state, qformer_tokenizer = read_hf_checkpoint(cfg.model.init_from, model_type="blip-2")
    name = cfg.model.language_model
    directory = checkpoint_dir(name)
    kind = load_pretrained(transformers.AutoConfig, directory, name)
    loader = transformers.AutoModelForSeq2SeqLM if kind.is_encoder_decoder else transformers.AutoModelForCausalLM
    language_model = load_pretrained(loader, directory, name)
    tokenizer = load_pretrained(transformers.AutoTokenizer, directory, name)
    tokenizer.padding_side = tokenizer.truncation_side = "right"  # as LAVIS sets them (LLaMA-style ones pad left)
    add_image_token(tokenizer, language_model)
    _check_lm_words(tokenizer, name, [("objective.caption_prompt", cfg.objective.caption_prompt)] + (
        [("data.caption_instructions", t) for t in cfg.data.caption_instructions] +
        [("data.question_templates", t.replace("{}", " ")) for t in cfg.data.question_templates] if instruct else []),
        exported=cfg.data.caption_instructions[0] if instruct else cfg.objective.caption_prompt)
    model = build_blip2_lm(config, state, language_model, instruct)
    model.prompt = lm_prompt(tokenizer, cfg.objective.caption_prompt, kind.is_encoder_decoder)
    model.qformer_tokenizer = None  # InstructBLIP: the Collate's, for the instructions
    if instruct:
        model.qformer_tokenizer = _instruction_vocabulary(cfg, model, qformer_tokenizer, texts, output, is_main,
                                                          resumed_run)
        model.caption_instruction = cfg.data.caption_instructions[0]  # the export's captioning instruction
    return model, tokenizer


def _check_lm_words(tokenizer, name: str, texts: list[tuple[str, str]], exported: str) -> None:
    """The LM reads the prompt and the instructions: a word its tokenizer does not know reads as [UNK]. The
    text the export keeps as its captioning prompt is refused before the run starts (the export held the
    prompt without those words, and the engine refuses such a prompt); the other instructions are warned
    of. A subword tokenizer (OPT's, T5's) spells any word."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    for key, text in texts:
        if not text.strip() or unk not in tokenizer(text, add_special_tokens=False)["input_ids"]:
            continue
        unknown = ", ".join(w for w in text.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"])
        message = (f"{key} {text.strip()!r} has words that the language model {name} does not know ({unknown}): "
                   "they read as its unknown token")
        if text == exported:
            raise InvalidInputError(f"{message}; use words of its vocabulary (a `train-lm` model knows those of "
                                    "its data)")
        log.warning("%s", message)


def _instruction_vocabulary(cfg: TrainConfig, model, tokenizer, texts: list[str], output: Path | None, is_main: bool,
                            resumed_run: Path | None = None):
    """The Q-Former's tokenizer with the words of the run's instructions and templates (saved in the run folder,
    where an export of its checkpoint, which has no training texts, and a run that resumes it find it again)."""
    from transformers import AutoTokenizer

    from .tokenizer import kept_vocabulary, warn_unknown_words

    saved = Path(output) / "qformer_tokenizer" if output is not None else None
    # resumed: written into `output` only once the checkpoint was restored (`loop.keep_vocabularies`)
    kept = kept_vocabulary(resumed_run, output, "qformer_tokenizer") if resumed_run is not None and texts else saved
    if (not texts or resumed_run is not None) and kept is not None and kept.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(kept)
        grow_qformer_rows(model, len(tokenizer))
        warn_unknown_words(tokenizer, texts)
        return tokenizer
    templates = [*cfg.data.caption_instructions, *(t.replace("{}", " ") for t in cfg.data.question_templates)]
    add_qformer_words(model, tokenizer, [*texts, *templates])
    if saved is not None and is_main and resumed_run is None:
        tokenizer.save_pretrained(saved)
    return tokenizer


def add_qformer_words(model, tokenizer, texts: list[str]) -> list[str]:
    """Words of the training texts (instructions, templates) that the stage-1 Q-Former's tokenizer lacks, as new
    tokens with new embedding rows (trained; initialised as BERT's): a word-level stage-1 vocabulary knows only
    its captions' words. A subword tokenizer (BERT's) lacks none. Returns the words added."""
    from .tokenizer import words_of

    known = tokenizer.get_vocab()
    if not texts or any(t.startswith("##") for t in known):  # a subword vocabulary spells any word
        return []
    new = [w for w in words_of(texts) if w not in known and tokenizer.tokenize(w) == [tokenizer.unk_token]]
    if new:
        from transformers import AddedToken

        # whole words only: an added "the" must not split "there"
        tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in new])
        grow_qformer_rows(model, len(tokenizer))
    return new


def grow_qformer_rows(model, rows: int) -> None:
    """The Q-Former's word embeddings with `rows` rows: the new ones drawn as BERT initialises them."""
    embeddings = model.qformer.embeddings.word_embeddings
    if rows <= embeddings.num_embeddings:
        return
    std = model.config.qformer_config.initializer_range
    extra = torch.empty(rows - embeddings.num_embeddings, embeddings.embedding_dim).normal_(0.0, std)
    grown = nn.Embedding(rows, embeddings.embedding_dim, padding_idx=embeddings.padding_idx)
    with torch.no_grad():
        grown.weight.copy_(torch.cat([embeddings.weight, extra]))
    model.qformer.embeddings.word_embeddings = grown
    model.config.qformer_config.vocab_size = rows


def lm_prompt(tokenizer, prompt: str, encoder_text: bool) -> tuple[int, ...]:
    """The caption prompt's LM tokens: after [BOS] for a decoder-only LM (no special tokens of its own); the
    encoder's whole text for an encoder-decoder one (with the tokenizer's special tokens, as LAVIS and
    `Blip2Processor` encode it)."""
    if not prompt.strip():
        return ()
    if not encoder_text:  # a caption follows after a space (`data.Collate.after_prompt`), not a space token
        prompt = prompt.strip()
    return tuple(int(i) for i in tokenizer(prompt, add_special_tokens=encoder_text)["input_ids"])


def _export_blip2_lm(model, tokenizer, out: Path, captioner: bool = True) -> list[Path]:
    from .blip2_lm import export_blip2_lm

    return [export_blip2_lm(model, tokenizer, out / "captioner", model.config.vision_config.image_size,
                            model.qformer_tokenizer)]


FAMILIES = {
    "blip": Family(_build_blip, partial(read_hf_checkpoint, model_type="blip"), load_hf_weights, _export_blip),
    "blip-2": Family(_build_blip2, partial(read_hf_checkpoint, model_type="blip-2"), load_blip2_weights,
                     _export_blip2),
    "blip-2-lm": Family(None, None, None, _export_blip2_lm, prepare=_prepare_blip2_lm, captioner_only=True),
    "instructblip": Family(None, None, None, _export_blip2_lm, prepare=partial(_prepare_blip2_lm, instruct=True),
                           captioner_only=True),
}
