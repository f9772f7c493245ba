"""Keyword search over each image row's words (its caption and the words of its files' paths), by BM25.

A query reads this index from the snapshot folder, so it loads with numpy alone, memory-mapped: opening it
costs a few file headers, and a query touches only its words' posting lists (no dictionary is built).

    keywords_vocab.npy          (T_bytes,) uint8: the distinct words, UTF-8, sorted, concatenated
    keywords_vocab_offsets.npy  (V+1,) int64: word i is vocab[offsets[i]:offsets[i+1]]
    keywords_starts.npy         (V+1,) int64: word i's postings are rows/freqs[starts[i]:starts[i+1]]
    keywords_rows.npy           (P,) int32: rows containing each word, ascending within a word
    keywords_freqs.npy          (P,) uint16: times the word occurs in that row (capped at 65535)
    keywords_lengths.npy        (N,) int32: words per row, for BM25's length normalisation

A word is found by binary search over the sorted vocabulary (log V byte-string comparisons), so query time
grows with the postings read, not with the vocabulary.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import unicodedata
from array import array
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PREFIX = "keywords"
MAX_TOKEN = 64  # characters a stored word has at most (a SHA-256 file name); longer runs are junk, and a query
# word that long matches nothing
K1, B = 1.2, 0.75  # BM25, as Lucene's defaults
_NAMES = ("vocab", "vocab_offsets", "starts", "rows", "freqs", "lengths")

# Han ideographs and hiragana are written without spaces: each is a word of its own (as Lucene's
# StandardTokenizer does), so "東京" finds "東京タワー". Katakana runs stay whole ("タワー").
_CJK = "\u3040-\u309f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff"
_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")  # [^\W_]: a letter or digit of any script
# for bytes.translate: letters and digits lower-cased, anything else a space
_ASCII_WORDS = bytes(ord(chr(c).lower()) if chr(c).isalnum() else 32 for c in range(128)) + b" " * 128


def tokens(text: str) -> list[str]:
    """The words of `text`: case-folded, accents dropped, split at anything not a letter or digit.

    Folding (NFKD, then every combining mark removed) lets "zurich" find "Zürich" and "cafe" find "café";
    queries fold the same way, so words still match where it drops more than accents (Indic vowel signs,
    the Japanese voicing marks: "ガ" becomes "カ"), at the cost of conflating a few distinct words. Known
    limit: scripts without spaces get no word segmentation (Thai runs stay one word; CJK splits by character).
    """
    return [w.decode() for w in _split(text)]


def _split(text: str, limit: int | None = MAX_TOKEN) -> list[bytes]:
    """`tokens` in UTF-8, the form the vocabulary keeps (words over `limit` characters left out). ASCII text
    (most paths and captions) takes a bytes path with the same result, 3x faster than the regex: it is most
    of the time of building at 1M rows."""
    limit = limit or math.inf
    if text.isascii():
        return [w for w in text.encode().translate(_ASCII_WORDS).split() if len(w) <= limit]
    return [w.encode() for w in _TOKEN.findall(_fold(text)) if len(w) <= limit]


def _fold(text: str) -> str:
    """Marks go before splitting, so that words whose vowels are marks (Devanagari) stay whole."""
    decomposed = unicodedata.normalize("NFKD", text).casefold()
    return "".join(c for c in decomposed if not unicodedata.category(c).startswith("M"))


class _Vocabulary:
    """The sorted words as a sequence of bytes, read from the memory-mapped blob for `bisect`."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self.blob, self.offsets = blob, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes()

    def find(self, word: bytes) -> int | None:
        i = bisect.bisect_left(self, word)
        return i if i < len(self) and self[i] == word else None


class KeywordIndex:
    """An inverted index of N rows' words (CSR postings); `search` ranks rows by BM25."""

    def __init__(self, vocab: np.ndarray, vocab_offsets: np.ndarray, starts: np.ndarray, rows: np.ndarray,
                 freqs: np.ndarray, lengths: np.ndarray):
        self.vocabulary = _Vocabulary(vocab, vocab_offsets)
        self.starts, self.rows, self.freqs, self.lengths = starts, rows, freqs, lengths
        self.mean_length = float(lengths.sum()) / max(len(lengths), 1)

    @classmethod
    def build(cls, documents: Sequence[str]) -> KeywordIndex:
        """One document per row (row i is documents[i]). Tokenising is the Python loop; the rest is numpy."""
        vocab: defaultdict[bytes, int] = defaultdict(itertools.count().__next__)  # word -> id, as first seen
        ids, counts = array("q"), array("q")  # (P_all,) word id of every token, row after row; (N,) tokens per row
        for words in map(_split, documents):
            counts.append(len(words))
            ids.extend(map(vocab.__getitem__, words))
        first_seen = list(vocab)
        order = sorted(range(len(first_seen)), key=first_seen.__getitem__)  # ids in sorted-word order
        words = [first_seen[i] for i in order]
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        n = max(len(documents), 1)
        lengths = np.frombuffer(counts, np.int64).astype(np.int32)
        keys = rank[np.frombuffer(ids, np.int64)] * n + np.repeat(np.arange(len(documents)), lengths)
        keys, freqs = np.unique(keys, return_counts=True)  # sorted by (word, row): CSR postings
        starts = np.zeros(len(words) + 1, np.int64)
        np.cumsum(np.bincount(keys // n, minlength=len(words)), out=starts[1:])
        vocab_offsets = np.zeros(len(words) + 1, np.int64)
        np.cumsum(np.fromiter(map(len, words), np.int64, len(words)), out=vocab_offsets[1:])
        return cls(np.frombuffer(b"".join(words), np.uint8), vocab_offsets, starts, (keys % n).astype(np.int32),
                   np.minimum(freqs, np.iinfo(np.uint16).max).astype(np.uint16), lengths)

    def _arrays(self) -> tuple[np.ndarray, ...]:
        v = self.vocabulary
        return v.blob, v.offsets, self.starts, self.rows, self.freqs, self.lengths

    def save(self, folder: Path) -> None:
        """Six plain .npy files (keywords_*.npy), each one that `load` can memory-map."""
        for name, values in zip(_NAMES, self._arrays(), strict=True):
            np.save(folder / f"{PREFIX}_{name}.npy", values)

    @classmethod
    def load(cls, folder: Path) -> KeywordIndex | None:
        """The saved index, memory-mapped; None where it is missing or inconsistent (the caller rebuilds)."""
        try:
            arrays = [np.load(folder / f"{PREFIX}_{name}.npy", mmap_mode="r") for name in _NAMES]
        except Exception:  # missing, truncated or not a .npy file
            return None
        vocab, vocab_offsets, starts, rows, freqs = arrays[:5]
        if any(a.ndim != 1 for a in arrays) or not len(vocab_offsets) == len(starts) >= 1:
            return None
        ends = (vocab_offsets[0], vocab_offsets[-1], starts[0], starts[-1])
        if ends != (0, len(vocab), 0, len(rows)) or len(freqs) != len(rows):
            return None
        return cls(*arrays)

    def __len__(self) -> int:
        return len(self.lengths)

    def _words(self, text: str) -> list[int | None]:
        """Vocabulary ids of the distinct words of `text` (None: a word no row has, as one too long to be kept)."""
        return [self.vocabulary.find(w) for w in dict.fromkeys(_split(text, limit=None))]

    def _postings(self, word: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.starts[word], self.starts[word + 1]
        return self.rows[lo:hi], self.freqs[lo:hi]

    def search(self, query: str, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows holding any word of `query` -> (rows int64, BM25 scores float64), best first, ties by row.

        A word repeated in the query counts once. `allowed` (sorted int64 rows) restricts the answer, not
        the statistics: idf and mean length stay those of the whole index, so a row scores the same either way.
        """
        words = [w for w in self._words(query) if w is not None]
        if not words:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        scores = np.zeros(len(self), np.float64)  # (N,) dense accumulator: each word's rows are distinct
        for word in words:
            rows, freqs = self._postings(word)
            df, tf = len(rows), freqs.astype(np.float64)
            idf = math.log(1 + (len(self) - df + 0.5) / (df + 0.5))  # Lucene's: never negative
            norm = K1 * (1 - B + B * self.lengths[rows] / self.mean_length)
            scores[rows] += idf * tf * (K1 + 1) / (tf + norm)
        hits = np.flatnonzero(scores) if allowed is None else allowed[scores[allowed] > 0]  # every term scores > 0
        return _top(hits.astype(np.int64), scores[hits], k)

    def rows_with_all(self, words: str) -> np.ndarray:
        """Sorted int64 rows whose document holds every word of `words` (the query's keyword filter)."""
        ids = self._words(words)
        if not ids:
            raise ValueError(f"{words!r} has no word to search for")
        if None in ids:
            return np.zeros(0, np.int64)
        lists = sorted((self._postings(w)[0] for w in ids), key=len)  # intersect from the shortest
        found = np.asarray(lists[0], np.int64)
        for rows in lists[1:]:
            at = np.searchsorted(rows, found)
            found = found[rows[np.minimum(at, len(rows) - 1)] == found]
        return found


def _top(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of ascending `rows`: a partition keeps everything tied with the k-th, a stable sort orders."""
    if len(scores) > k > 0:
        keep = scores >= np.partition(scores, -k)[-k]
        rows, scores = rows[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")[:k]
    return rows[order], scores[order]
