"""Text to token ids with the checkpoint's own tokenizer, through the `tokenizers` library directly.

transformers' BERT tokenizers are `tokenizers` objects underneath; loading `tokenizer.json` ourselves
gives the same ids (tests/test_models.py) without importing transformers on the query path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import TextTokens


class TextTokenizer:
    def __init__(self, backend, max_length: int):
        import tokenizers

        self._tokenizer = tokenizers.Tokenizer.from_str(backend.to_str())  # a private copy to configure
        self._tokenizer.enable_truncation(max_length=max_length)
        pad = self._tokenizer.token_to_id("[PAD]")
        self._tokenizer.enable_padding(pad_id=0 if pad is None else pad, pad_token="[PAD]")

    @classmethod
    def from_directory(cls, directory: Path, max_length: int) -> TextTokenizer | None:
        """From `tokenizer.json`, or None where the checkpoint has only slow-tokenizer files."""
        import tokenizers

        path = directory / "tokenizer.json"
        return cls(tokenizers.Tokenizer.from_file(str(path)), max_length) if path.is_file() else None

    def __call__(self, texts: list[str]) -> TextTokens:
        encodings = self._tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return TextTokens(input_ids=ids, attention_mask=mask)

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)
