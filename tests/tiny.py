"""Tiny random BLIP checkpoints for tests: built and saved here, loaded by path like any user model."""

from __future__ import annotations

from pathlib import Path

WORDS = [
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "image", "dog", "cat", "beach",
    "car", "red", "green", "blue", "yellow", "white", "black", "circle", "square", "triangle", "left",
    "right", "above", "below", "small", "large", "big", "sky", "tree", "house", "sea",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_tokenizer(directory: Path, with_enc: bool = True):
    """A word-level BERT tokenizer: [PAD]=0 ... words ... [DEC] (bos) and optionally [ENC] last."""
    from transformers import BertTokenizer

    tokens = SPECIALS + WORDS + ["[DEC]"] + (["[ENC]"] if with_enc else [])
    directory.mkdir(parents=True, exist_ok=True)
    extra = {"extra_special_tokens": ["[ENC]"]} if with_enc else {}
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", **extra)
    tokenizer.save_pretrained(directory)
    return tokenizer, len(tokens)


def tiny_config(vocab_size: int, image_size: int = 32, patch_size: int = 8, bos_token_id: int | None = None):
    from transformers import BlipConfig

    bos = vocab_size - 2 if bos_token_id is None else bos_token_id
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, bos_token_id=bos, pad_token_id=0,
                sep_token_id=SPECIALS.index("[SEP]"), initializer_range=0.2)
    # BLIP's vision default initializer_range is 1e-10: every image would look the same.
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=patch_size, initializer_range=0.2)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def save_tiny_blip(directory: Path, seed: int = 0, with_enc: bool = True, image_size: int = 32,
                   model_class: str = "BlipForImageTextRetrieval") -> Path:
    """Save a random tiny checkpoint (model + tokenizer + image processor) that `--model` accepts."""
    import torch
    import transformers

    tokenizer, vocab_size = save_tokenizer(directory, with_enc=with_enc)
    # [DEC] is the bos token; without [ENC] in the tokenizer its row follows [DEC] as in BLIP.
    config = tiny_config(vocab_size + (0 if with_enc else 1), image_size=image_size,
                         bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"))
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    model.save_pretrained(directory)
    save_processor(directory, tokenizer, image_size)
    return directory


def save_processor(directory: Path, tokenizer, image_size: int) -> None:
    """As transformers 5 saves a BLIP processor: processor_config.json with the image processor nested."""
    import transformers

    images = transformers.BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    transformers.BlipProcessor(images, tokenizer).save_pretrained(directory)
