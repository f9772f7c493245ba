import math
from collections import Counter

import numpy as np
import pytest

from blipsearch.indexer import keywords
from blipsearch.indexer.keywords import KeywordIndex, tokens

CORPUS = [
    "a dog running on the beach /photos/2019/IMG_2019-05-04 dog-on-beach.jpg",
    "a cat sleeping on a sofa /photos/2019/cat.jpg",
    "two dogs and a dog playing in the snow /photos/2020/snow/DSC0042.JPG",
    "",
    "a red car parked on the street /photos/cars/red_car.png",
    "a dog /x.jpg",
    "a dog /x.jpg",  # a twin of row 5: equal scores, ordered by row
    "sunset over the lake in Zürich /photos/Zürich/lake.jpg",
]


def reference_bm25(documents: list[str], query: str) -> list[tuple[int, float]]:
    """BM25 written out as in the textbooks, one row at a time (k1 1.2, b 0.75, Lucene's idf)."""
    docs = [Counter(tokens(d)) for d in documents]
    lengths = [sum(d.values()) for d in docs]
    mean = sum(lengths) / len(docs)
    scored = []
    for row, doc in enumerate(docs):
        score = 0.0
        for word in set(tokens(query)):
            if doc[word]:
                df = sum(1 for d in docs if word in d)
                idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
                score += idf * doc[word] * 2.2 / (doc[word] + 1.2 * (0.25 + 0.75 * lengths[row] / mean))
        if score:
            scored.append((row, score))
    return sorted(scored, key=lambda r: (-r[1], r[0]))


def test_tokens_split_at_punctuation_underscores_and_dashes():
    assert tokens("/photos/2019/IMG_2019-05-04 dog-on-beach.jpg") == [
        "photos", "2019", "img", "2019", "05", "04", "dog", "on", "beach", "jpg"]
    assert tokens("Hello, World! (it's) a+b=c\tx\ny") == ["hello", "world", "it", "s", "a", "b", "c", "x", "y"]
    assert tokens("x" * 64 + " " + "y" * 65 + " z") == ["x" * 64, "z"]  # longer than 64 characters: dropped
    assert tokens("") == tokens(" _-/ ") == []


def test_tokens_fold_accents_and_keep_letters_of_every_script():
    assert tokens("Zürich CAFÉ naïve Straße") == ["zurich", "cafe", "naive", "strasse"]
    assert tokens("Москва-Αθήνα_ΣΟΦΙΑ") == ["москва", "αθηνα", "σοφια"]
    assert tokens("東京タワー 2019") == ["東", "京", "タワー", "2019"]  # Han per character, katakana runs whole
    assert tokens("नमस्ते दुनिया") == ["नमसत", "दनय"]  # vowel signs are marks: dropped, the word stays whole
    assert tokens("x\udcff y") == ["x", "y"]  # a path's undecodable byte (surrogateescape) separates


def test_ascii_shortcut_equals_the_general_rule():
    text = "".join(map(chr, range(128))) + " IMG_2019-05-04 dog-on-beach.JPG " + "q" * 65
    general = [w.encode() for w in keywords._TOKEN.findall(keywords._fold(text)) if len(w) <= keywords.MAX_TOKEN]
    assert keywords._split(text) == general
    assert len(general) > 10


def test_folded_words_match_both_ways():
    index = KeywordIndex.build(["lake in Zürich", "zurich station", "bern"])
    for query in ("zurich", "Zürich", "ZURICH"):
        assert index.search(query, 5)[0].tolist() == [1, 0]  # the shorter row first
        assert index.rows_with_all(query).tolist() == [0, 1]


@pytest.mark.parametrize("query", ["dog", "dog beach", "the a on", "jpg photos 2019", "zurich lake sunset",
                                   "dog dog cat", "snow dogs"])
def test_bm25_equals_a_plain_computation(query):
    rows, scores = KeywordIndex.build(CORPUS).search(query, len(CORPUS))
    expected = reference_bm25(CORPUS, query)
    assert rows.tolist() == [r for r, _ in expected]
    np.testing.assert_allclose(scores, [s for _, s in expected], rtol=0, atol=1e-6)
    assert rows.dtype == np.int64


def test_rarer_word_ranks_higher_and_ties_go_by_row():
    index = KeywordIndex.build(["common x", "rare y", "common z", "common w", "common rare"])  # equal lengths
    rows, scores = index.search("common rare", 3)
    assert rows.tolist() == [4, 1, 0]  # both words; the rare one alone; then the lowest of three common-only rows
    assert scores[1] > scores[2]
    assert index.search("common", 2)[0].tolist() == [0, 2]  # equal length and tf: equal scores, by row


def test_allowed_restricts_rows_but_not_scores():
    index = KeywordIndex.build(CORPUS)
    rows, scores = index.search("dog beach", len(CORPUS))
    allowed = np.array([1, 2, 5, 7], np.int64)
    kept = np.isin(rows, allowed)
    sub_rows, sub_scores = index.search("dog beach", len(CORPUS), allowed=allowed)
    assert sub_rows.tolist() == rows[kept].tolist() == [5, 2]
    np.testing.assert_array_equal(sub_scores, scores[kept])
    assert len(index.search("dog", 5, allowed=np.zeros(0, np.int64))[0]) == 0


def test_rows_with_all_intersects():
    index = KeywordIndex.build(CORPUS)
    assert index.rows_with_all("dog").tolist() == [0, 2, 5, 6]
    assert index.rows_with_all("Dog JPG").tolist() == [0, 2, 5, 6]  # ".JPG" of row 2
    assert index.rows_with_all("dog X").tolist() == [5, 6]
    assert index.rows_with_all("photos 2019 jpg").tolist() == [0, 1]
    assert index.rows_with_all("dog zebra").tolist() == []
    assert index.rows_with_all("dog").dtype == np.int64
    # a word too long to be kept matches nothing (it was left out, so "dog" + 65 x's found the dogs)
    assert index.rows_with_all("dog " + "x" * 65).tolist() == [] and index.rows_with_all("x" * 65).tolist() == []


def test_a_sha256_file_name_is_a_word():
    name = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    index = KeywordIndex.build(["/photos/dog.jpg", f"/photos/{name}.jpg"])
    assert index.rows_with_all(name.upper()).tolist() == [1] and index.search(name, 5)[0].tolist() == [1]
    with pytest.raises(ValueError, match="no word to search for"):
        index.rows_with_all(" -_/ ")


def test_save_load_round_trip(tmp_path):
    index = KeywordIndex.build(CORPUS)
    index.save(tmp_path)
    assert all(p.name.startswith("keywords") for p in tmp_path.iterdir())
    loaded = KeywordIndex.load(tmp_path)
    assert loaded is not None and len(loaded) == len(index) == len(CORPUS)
    for query in ("dog beach", "zürich", "jpg", "zebra"):
        for got, want in zip(loaded.search(query, 4), index.search(query, 4), strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(loaded.rows_with_all(query), index.rows_with_all(query))


def test_load_of_missing_or_damaged_files_is_none(tmp_path):
    assert KeywordIndex.load(tmp_path / "absent") is None
    KeywordIndex.build(CORPUS).save(tmp_path)
    rows = tmp_path / "keywords_rows.npy"
    data = rows.read_bytes()
    rows.write_bytes(data[:-4])  # truncated
    assert KeywordIndex.load(tmp_path) is None
    np.save(rows, np.zeros(3, np.int32))  # well-formed, but not the rows the offsets point into
    assert KeywordIndex.load(tmp_path) is None
    rows.write_bytes(b"garbage")
    assert KeywordIndex.load(tmp_path) is None
    rows.write_bytes(data)
    assert KeywordIndex.load(tmp_path) is not None
    starts = tmp_path / "keywords_starts.npy"
    np.save(starts, np.array([0, len(np.load(rows))]))  # ends agree, but a row count short of the vocabulary's
    assert KeywordIndex.load(tmp_path) is None
    (tmp_path / "keywords_vocab.npy").unlink()
    assert KeywordIndex.load(tmp_path) is None


def test_empty_corpus_and_empty_documents(tmp_path):
    for documents in ([], ["", " - ", ""]):
        index = KeywordIndex.build(documents)
        index.save(tmp_path)
        loaded = KeywordIndex.load(tmp_path)
        assert loaded is not None and len(loaded) == len(index) == len(documents)
        rows, scores = loaded.search("dog", 5)
        assert rows.tolist() == [] and scores.tolist() == []
        assert loaded.rows_with_all("dog").tolist() == []
    index = KeywordIndex.build(["", "dog", ""])
    assert index.search("dog", 5)[0].tolist() == [1]


def test_query_without_a_known_word_is_empty():
    index = KeywordIndex.build(CORPUS)
    for query in ("zebra", "", "!!!", "a" * 65):
        rows, scores = index.search(query, 5)
        assert (rows.dtype, scores.dtype, len(rows), len(scores)) == (np.int64, np.float64, 0, 0)
