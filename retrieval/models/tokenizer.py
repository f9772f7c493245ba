"""Text to token ids with the checkpoint's own tokenizer, through the `tokenizers` library directly.

transformers' BERT tokenizers are `tokenizers` objects underneath; loading `tokenizer.json` ourselves
gives the same ids (tests/test_models.py) without importing transformers on the query path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InvalidInputError, ModelLoadError, first_line, printable
from .base import TextTokens
from .loading import from_pretrained

MAX_TEXT_TOKENS = 35  # as in BLIP/LAVIS retrieval evaluation (BLIP and BLIP-2)


class TextTokenizer:
    def __init__(self, backend, max_length: int):
        """`backend`: a `tokenizers.Tokenizer` of this object's own; truncation and padding are set on it."""
        self._tokenizer = backend
        self._tokenizer.enable_truncation(max_length=max_length)
        pad = self._tokenizer.token_to_id("[PAD]")
        self._tokenizer.enable_padding(pad_id=0 if pad is None else pad, pad_token="[PAD]")

    @classmethod
    def from_directory(cls, directory: Path, max_length: int) -> TextTokenizer | None:
        """From `tokenizer.json`, or None where the checkpoint has only slow-tokenizer files."""
        import tokenizers

        path = directory / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a damaged file
            raise ModelLoadError(f"cannot read {path} ({first_line(exc)}); download the model again or "
                                 "re-export it") from exc
        return cls(backend, max_length)

    @classmethod
    def load(cls, directory: Path, name: str, max_length: int = MAX_TEXT_TOKENS) -> TextTokenizer:
        """From `tokenizer.json`, else through transformers' `AutoTokenizer` (slow-tokenizer files only)."""
        return cls.from_directory(directory, max_length) or cls._via_transformers(directory, name, max_length)

    @classmethod
    def _via_transformers(cls, directory: Path, name: str, max_length: int) -> TextTokenizer:
        from transformers import AutoTokenizer

        tokenizer = from_pretrained(directory, name, AutoTokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ModelLoadError(f"model {name}: its tokenizer has no fast (tokenizers) backend")
        import tokenizers

        # a private copy to configure: transformers' tokenizer keeps using its own (a copy costs ~30 ms, so the
        # tokenizer.json path above, whose object is ours alone, takes none)
        return cls(tokenizers.Tokenizer.from_str(backend.to_str()), max_length)

    def __call__(self, texts: list[str]) -> TextTokens:
        """Tokens as torch tensors."""
        import torch

        tokens = self.arrays(texts)
        return TextTokens(torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask))

    def arrays(self, texts: list[str]) -> TextTokens:
        """Tokens as int64 numpy arrays (no torch)."""
        for text in texts:
            _require_utf8(text)
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return TextTokens(input_ids=ids, attention_mask=mask)

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


def _require_utf8(text: str) -> None:
    """Text from a non-UTF-8 source (argv bytes decoded with surrogateescape) holds lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"the query text '{printable(text)}' is not valid UTF-8 (character {exc.start + 1}); type it again in a "
            "terminal set to UTF-8 (e.g. LANG=C.UTF-8)") from exc
