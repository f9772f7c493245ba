"""Tokenizers for training: BLIP's special tokens on a given tokenizer, or a word-level vocabulary.

BLIP adds two tokens to BERT's vocabulary: `[DEC]` (the bos token that starts the decoder's text) and
`[ENC]` (replaces `[CLS]` when the text encoder attends to the image, for ITM). Without a downloadable
BERT vocabulary (offline, or for synthetic data) a word-level vocabulary built from the training
captions does the job: [PAD]=0, [UNK], [CLS], [SEP], [MASK], the words, [DEC], [ENC].
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from blipsearch.retrieval.errors import InvalidInputError

log = logging.getLogger(__name__)

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    cls: int
    sep: int
    bos: int  # [DEC]
    enc: int  # [ENC]
    vocab_size: int  # rows of the word embedding
    prompt: tuple[int, ...] = ()  # the caption prompt's tokens (objective.caption_prompt), without [CLS]/[SEP]


def words_of(captions: Iterable[str]) -> list[str]:
    """Sorted distinct words and punctuation marks as BERT's normaliser and pre-tokeniser split them
    (lower-cased, accents stripped, each Chinese character a word): exactly what a word-level BertTokenizer
    looks up. (A plain lower-cased split kept "café" and "一只猫", which the tokenizer reads as "cafe" and
    three characters: [UNK], without a warning.)"""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, splitter = BertNormalizer(lowercase=True), BertPreTokenizer()
    return sorted({w for caption in captions for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(caption))})


def word_tokenizer(captions: Iterable[str], directory: str | Path | None = None):
    """A BertTokenizer over exactly the captions' words; saved to `directory` when given."""
    from transformers import BertTokenizer

    tokens = [*SPECIALS, *words_of(captions), "[DEC]", "[ENC]"]
    # transformers 5: `vocab=` takes the mapping (a `vocab_file=` argument would be ignored)
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True,
                              bos_token="[DEC]", extra_special_tokens=["[ENC]"])
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(directory)
        log.info("word-level tokenizer with %d tokens written to %s", len(tokens), directory)
    return tokenizer


def kept_vocabulary(resumed_run: Path, output: Path | None, name: str) -> Path | None:
    """The vocabulary folder `name` (`tokenizer`, `qformer_tokenizer`) that a resumed run reads: its
    checkpoint's run's, else the output folder's (a checkpoint copied aside), else None."""
    folders = (resumed_run, output) if output is not None else (resumed_run,)
    return next((Path(folder) / name for folder in folders if (Path(folder) / name).is_dir()), None)


def warn_unknown_words(tokenizer, texts: Iterable[str]) -> list[str]:
    """Words of `texts` that a word-level `tokenizer` (a run's, kept when it resumes) reads as [UNK], logged
    once; a subword vocabulary spells any word. Returns them."""
    known = tokenizer.get_vocab()
    if any(t.startswith("##") for t in known):
        return []
    unknown = [w for w in words_of(texts) if w not in known]
    if unknown:
        log.warning("%d words of the training texts are not in the run's vocabulary (e.g. %s): they read as "
                    "[UNK]; a new run (another output folder) learns them", len(unknown), ", ".join(unknown[:5]))
    return unknown


def load_tokenizer(name: str):
    """A tokenizer by directory or hub id, with `[DEC]` and `[ENC]` added when it lacks them."""
    from transformers import AutoTokenizer

    from .export import checkpoint_dir, load_pretrained

    # a tokenizer folder has no model config.json, which a checkpoint folder needs
    directory = Path(name) if Path(name).is_dir() else checkpoint_dir(name)
    tokenizer = load_pretrained(AutoTokenizer, directory, name)
    if tokenizer.bos_token is None:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if tokenizer.convert_tokens_to_ids("[ENC]") in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def special_ids(tokenizer, vocab_size: int | None = None, prompt: str = "") -> SpecialIds:
    """The ids the model needs; `vocab_size` is the checkpoint's when it has rows the tokenizer lacks."""
    ids = dict(pad=tokenizer.pad_token_id, cls=tokenizer.cls_token_id, sep=tokenizer.sep_token_id,
               bos=tokenizer.bos_token_id)
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise InvalidInputError(f"the tokenizer has no {', '.join(missing)} token; BLIP needs [PAD], [CLS], "
                                "[SEP] and a bos token ([DEC])")
    enc = tokenizer.convert_tokens_to_ids("[ENC]")
    if enc is None or enc == tokenizer.unk_token_id:
        enc = ids["bos"] + 1  # BLIP's vocabulary: [ENC] follows [DEC] (Hugging Face conversions drop the token)
    size = max(len(tokenizer), vocab_size or 0, enc + 1)
    prompt_ids = tuple(int(i) for i in tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else ()
    if tokenizer.unk_token_id in prompt_ids:
        raise InvalidInputError(f"the tokenizer does not know every word of objective.caption_prompt {prompt!r}")
    return SpecialIds(vocab_size=size, enc=int(enc), prompt=prompt_ids, **{k: int(v) for k, v in ids.items()})
