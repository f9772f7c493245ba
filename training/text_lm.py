"""A small language model pre-trained on text, for BLIP-2 and InstructBLIP demos that run offline.

BLIP-2's second stage feeds a frozen, pre-trained LM (OPT, Flan-T5, Vicuna). None ships with the project's
dependencies and the hub may be out of reach, so this module pre-trains one: an `OPTForCausalLM` of a few
layers over a word-level vocabulary, on the texts of an annotation file (captions, and "question answer"
for entries with an instruction), with the causal LM loss. It knows the words of its data and nothing else:
a stand-in that lets stage 2 and InstructBLIP run end to end, not a language model in any general sense.

    blipsearch train-lm /tmp/scenes/train.json runs/scenes-lm --steps 1500
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from blipsearch.retrieval.errors import InvalidInputError

from .export import readable
from .tokenizer import SPECIALS, words_of

log = logging.getLogger(__name__)


@dataclass
class TextLMConfig:
    hidden: int = 128  # OPT's hidden_size (= word_embed_proj_dim)
    layers: int = 2
    heads: int = 4
    ffn: int = 512
    max_positions: int = 64  # tokens: captions and question/answer texts are short
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    threads: int | None = None


def texts_of(annotation: str | Path) -> list[str]:
    """Every caption of a LAVIS annotation file, and "question answer" for entries with an "instruction"."""
    path = Path(annotation)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read the annotation file {path}: {exc}") from exc
    texts = []
    for entry in entries if isinstance(entries, list) else []:
        captions = entry.get("caption")
        captions = [captions] if isinstance(captions, str) else list(captions or [])
        question = entry.get("instruction")
        texts += [f"{question} {c}" if isinstance(question, str) else c for c in captions if isinstance(c, str)]
    if not texts:
        raise InvalidInputError(f"{path} holds no caption: give a LAVIS annotation file")
    return texts


def text_tokenizer(texts: list[str]):
    """A word-level BertTokenizer over the texts' words: [CLS] starts a text (OPT's BOS), [SEP] ends it."""
    from transformers import BertTokenizer

    tokens = [*SPECIALS, *words_of(texts)]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)


def pretrain_lm(texts: list[str], out: str | Path, cfg: TextLMConfig | None = None, overwrite: bool = False) -> Path:
    """Train an OPT from scratch on `texts`; saves it with its tokenizer to `out` (loadable by
    `AutoModelForCausalLM` / `AutoTokenizer`, as `model.language_model` of a stage-2 or InstructBLIP run).

    An `out` that holds files is refused before training, unless `overwrite`: then it is swapped whole for
    the new model once that is written (no file of the old one stays beside it)."""
    from transformers import OPTConfig, OPTForCausalLM

    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not overwrite):
        raise InvalidInputError(f"output {out} is {'a file' if out.is_file() else 'not empty'}; name a new folder"
                                f"{'' if out.is_file() else ', or pass --overwrite to replace it'}")
    cfg = cfg or TextLMConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = text_tokenizer(texts)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, word_embed_proj_dim=cfg.hidden,
                       ffn_dim=cfg.ffn, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                       max_position_embeddings=cfg.max_positions, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                       dropout=0.1, init_std=0.02)
    model = OPTForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warmup = min(cfg.warmup, max(1, cfg.steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    rng = random.Random(cfg.seed)
    for step in range(cfg.steps):
        batch = tokenizer(rng.sample(texts, min(cfg.batch_size, len(texts))), padding="longest", truncation=True,
                          max_length=cfg.max_positions, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == cfg.steps - 1:
            log.info("step %d  lm_loss %.4f", step, float(loss))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _save(model, tokenizer, cfg, len(texts), staging)
        readable(staging / "model")
        if out.exists():
            os.replace(out, staging / "replaced")  # removed with the staging folder
        os.replace(staging / "model", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("language model written to %s", out)
    return out


def _save(model, tokenizer, cfg: TextLMConfig, texts: int, staging: Path) -> None:
    out = staging / "model"
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        "# A small language model pre-trained by blipsearch\n\n"
        f"An OPT ({cfg.layers} layers, {cfg.hidden} wide, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters) trained from scratch for {cfg.steps} steps on {texts} texts of its training data "
        "(captions, and questions with their answers). It knows those words and nothing else: a stand-in "
        "for a pre-trained LM in offline demos of BLIP-2 stage 2 and InstructBLIP.\n", encoding="utf-8")
