"""Two-stage search: re-rank from stored features against the plain fp32 recompute, and the options."""

from pathlib import Path

import numpy as np
import pytest
import torch

from blipsearch.indexer.images import load_image
from blipsearch.indexer.pipeline import IndexOptions, index_folders
from blipsearch.indexer.reader import IndexReader
from blipsearch.indexer.store import IndexWriter
from blipsearch.retrieval.errors import FieldError, InvalidInputError
from blipsearch.retrieval.fusion import fuse
from blipsearch.retrieval.search import Searcher, SearchOptions

from photos import make_folder

# int8 features (indexer/codec.py) move a fused score by at most this much on the tiny model; on BLIP
# ViT-B the measured figure is in README (Performance).
STORED_FEATURE_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("search")
    paths = make_folder(root / "photos" / "a", 6, seed=1) + make_folder(root / "photos" / "b", 6, seed=2)
    store = IndexWriter.open(root / "index", tiny_model.info)
    index_folders([root / "photos"], tiny_model, store, IndexOptions(progress=False))
    store.close()
    return IndexReader.open(root / "index"), paths, root


def recompute(model, text, paths):
    """The plain computation: vision tower on the files, fp32 features, no storage in between."""
    pixels = model.pixel_values([load_image(p, model.info.preprocessing).pixels for p in paths])
    images = model.encode_images(pixels)
    query = model.encode_texts([text])
    itc = images.embeddings[:, 0, :] @ query.embeddings[0]
    return fuse(itc, model.itm_scores(query.tokens, images.features)), itc


def test_rerank_from_stored_features_matches_the_fp32_recompute(indexed, tiny_model):
    store, paths, _ = indexed
    hits = Searcher(tiny_model, store).search_text("a red dog on the beach", SearchOptions(top=12, candidates=12))
    by_path = {store.paths_by_hash([h.key])[h.key][0]: h for h in hits}
    scores, itc = recompute(tiny_model, "a red dog on the beach", paths)
    ours = torch.tensor([by_path[str(p)].score for p in paths])
    torch.testing.assert_close(torch.tensor([by_path[str(p)].itc for p in paths]), itc, atol=1e-5, rtol=0)
    assert (ours - scores).abs().max() < STORED_FEATURE_TOLERANCE
    assert scores.max() - scores.min() > 10 * STORED_FEATURE_TOLERANCE  # the scores do differ
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_rerank_reorders_the_itc_candidates(indexed, tiny_model):
    store, _, _ = indexed
    searcher = Searcher(tiny_model, store)
    itc_only = searcher.search_text("a blue car", SearchOptions(top=12, rerank=False))
    reranked = searcher.search_text("a blue car", SearchOptions(top=12, candidates=12))
    assert [h.itm_prob for h in itc_only] == [None] * 12
    assert [h.score for h in itc_only] == [h.itc for h in itc_only]
    assert {h.key for h in reranked} == {h.key for h in itc_only}
    assert [h.key for h in reranked] != [h.key for h in itc_only]


def test_only_the_recalled_candidates_are_reranked(indexed, tiny_model):
    store, _, _ = indexed
    searcher = Searcher(tiny_model, store)
    itc_only = searcher.search_text("a cat", SearchOptions(top=5, rerank=False))
    reranked = searcher.search_text("a cat", SearchOptions(top=2, candidates=5))
    assert {h.key for h in reranked} < {h.key for h in itc_only}
    # asking for more results than candidates re-ranks that many: --top is honoured
    assert len(searcher.search_text("a cat", SearchOptions(top=8, candidates=3))) == 8


def test_min_prob_and_folder_filter(indexed, tiny_model):
    store, _, root = indexed
    searcher = Searcher(tiny_model, store)
    everything = searcher.search_text("a dog", SearchOptions(top=12, candidates=12))
    middle = float(np.median([h.itm_prob for h in everything]))
    kept = searcher.search_text("a dog", SearchOptions(top=12, candidates=12, min_prob=middle))
    assert kept == [h for h in everything if h.itm_prob >= middle] and 0 < len(kept) < 12
    under_b = searcher.search_text("a dog", SearchOptions(top=12, candidates=3, under=[str(root / "photos" / "b")]))
    assert len(under_b) == 6  # every image under b, and nothing else
    assert all(p.startswith(str(root / "photos" / "b")) for h in under_b for p in store.paths_by_hash([h.key])[h.key])


def test_option_errors_are_typed():
    with pytest.raises(InvalidInputError, match=r"^min_prob needs the ITM re-rank"):
        SearchOptions(rerank=False, min_prob=0.5)
    with pytest.raises(InvalidInputError, match="between 0 and 1"):
        SearchOptions(min_prob=2)
    # wrong types: named in one line when the options are made, not a TypeError deep inside a search
    for name, value in (("top", 2.5), ("top", True), ("candidates", "64"), ("after", "2020"), ("before", 1.5)):
        with pytest.raises(FieldError, match=rf"^{name} must be"):
            SearchOptions(**{name: value})
    with pytest.raises(FieldError, match=r"^min_prob must lie"):
        SearchOptions(min_prob="0.5")
    for under in ("/photos", Path("/photos"), [Path("/photos")], ["photos"], ["/pho\0tos"], 3):
        with pytest.raises(FieldError, match=r"^under must be a list of absolute folder paths"):
            SearchOptions(under=under)
    assert SearchOptions(under=["/photos", "s3://bucket/photos"], top=np.int64(3), after=0).top == 3


def test_ann_recall_agrees_with_exact_search():
    from blipsearch.indexer.recall import RecallIndex

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4000, 1, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    exact, ann = RecallIndex.build(vectors), RecallIndex.build(vectors, exact_limit=1000)
    assert exact.exact and not ann.exact
    query = vectors[7, 0]
    rows, scores = exact.search(query, 10)
    assert rows[0] == 7 and scores[0] == pytest.approx(1.0, abs=1e-5)
    ann_rows, _ = ann.search(query, 10)
    assert len(set(rows) & set(ann_rows)) >= 8
    subset = np.arange(100, 200)
    sub_rows, _ = ann.search(query, 5, allowed=subset)
    np.testing.assert_array_equal(sub_rows, exact.search(query, 5, allowed=subset)[0])


def test_several_vectors_per_image_score_by_their_maximum():
    from blipsearch.indexer.recall import RecallIndex

    vectors = np.zeros((3, 2, 4), np.float32)
    vectors[0, 0, 0] = vectors[1, 1, 1] = vectors[2, 0, 2] = 1.0
    vectors[0, 1, 1] = 0.5
    rows, scores = RecallIndex.build(vectors).search(np.array([0, 1, 0, 0], np.float32), 3)
    assert list(rows[:2]) == [1, 0] and list(scores[:2]) == [1.0, 0.5]


def test_several_query_vectors_score_an_image_by_its_best_pair():
    """An image query of V vectors: exact top-k by max over (query vector, stored vector) pairs."""
    from blipsearch.indexer.recall import RecallIndex

    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(300, 4, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    queries = vectors[11] + 0.1 * rng.normal(size=(4, 8)).astype(np.float32)
    best = np.einsum("nvd,qd->nvq", vectors, queries).max(axis=(1, 2))  # (N,) brute force
    expected = np.argsort(-best, kind="stable")[:10]
    rows, scores = RecallIndex.build(vectors).search(queries, 10)
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, best[expected], rtol=1e-5)
    assert RecallIndex.build(vectors).search(vectors[5], 1)[1][0] == pytest.approx(1.0, abs=1e-5)


def test_the_recall_index_is_chosen_by_size_and_the_pq_tier_rescores_exactly(tmp_path):
    """exact -> IVF-Flat -> IVF-PQ with exact re-scoring; each agrees with exact search on clustered data."""
    from blipsearch.indexer.recall import RecallIndex

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(200, 64)).astype(np.float32)
    vectors = centres[rng.integers(0, 200, 20_000)] + 0.3 * rng.normal(size=(20_000, 64)).astype(np.float32)
    vectors = (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True))[:, None, :]
    exact = RecallIndex.build(vectors)
    flat = RecallIndex.build(vectors, exact_limit=1000)
    pq = RecallIndex.build(vectors, exact_limit=1000, flat_limit=10_000)
    assert (exact.kind, flat.kind, pq.kind) == ("exact", "ivf-flat", "ivf-pq")
    pq.save(tmp_path)
    loaded = RecallIndex.load(tmp_path)
    assert loaded.kind == "ivf-pq" and isinstance(loaded.exact_vectors, np.memmap)
    found = []
    for i in range(20):
        query = vectors[i * 97, 0]
        truth_rows, _ = exact.search(query, 10)
        rows, scores = loaded.search(query, 10)
        found.append(len(set(rows) & set(truth_rows)))
        np.testing.assert_allclose(scores, (vectors[rows, 0] @ query), atol=2e-3)  # exact cosines (float16 copy)
    assert sum(found) / 200 >= 0.9
    subset = np.arange(3000, 3500)
    np.testing.assert_array_equal(loaded.search(vectors[3100, 0], 5, allowed=subset)[0][:1], [3100])


def test_scores_of_given_rows_are_exact_in_every_tier():
    """Hybrid search asks the ITC cosine of keyword hits by row: the same figure as brute force, in order."""
    from blipsearch.indexer.recall import RecallIndex

    rng = np.random.default_rng(8)
    vectors = rng.normal(size=(3000, 2, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    query = vectors[4, 1] + 0.1 * rng.normal(size=16).astype(np.float32)
    rows = np.array([2999, 4, 17, 4])
    truth = (vectors[rows] @ query).max(axis=1)
    for index in (RecallIndex.build(vectors), RecallIndex.build(vectors, exact_limit=1000),
                  RecallIndex.build(vectors, exact_limit=1000, flat_limit=2000)):
        np.testing.assert_allclose(index.scores(query, rows), truth, atol=2e-3, err_msg=index.kind)


def test_stored_vectors_are_read_in_every_tier(tmp_path):
    from blipsearch.indexer.recall import RecallIndex

    vectors = np.random.default_rng(10).normal(size=(3000, 2, 16)).astype(np.float32)
    rows = np.array([2999, 4])
    np.testing.assert_array_equal(RecallIndex.build(vectors).vectors(rows), vectors[rows])
    pq = RecallIndex.build(vectors, exact_limit=1000, flat_limit=2000)  # its float16 copy
    assert pq.kind == "ivf-pq"
    np.testing.assert_allclose(pq.vectors(rows), vectors[rows], rtol=1e-3, atol=1e-3)
    ivf_flat = RecallIndex.build(vectors, exact_limit=1000)
    assert ivf_flat.kind == "ivf-flat"
    np.testing.assert_array_equal(ivf_flat.vectors(rows), vectors[rows])
    ivf_flat.save(tmp_path)  # and as a query process maps it
    np.testing.assert_array_equal(RecallIndex.load(tmp_path).vectors(rows), vectors[rows])


def test_rows_outside_the_index_are_refused_in_every_tier():
    """A negative row would read the last image's vectors, and FAISS' selectors skip unknown ids: both refuse."""
    from blipsearch.indexer.recall import RecallIndex

    vectors = np.random.default_rng(9).normal(size=(3000, 1, 16)).astype(np.float32)
    query = vectors[5, 0]
    for index in (RecallIndex.build(vectors), RecallIndex.build(vectors, exact_limit=1000),
                  RecallIndex.build(vectors, exact_limit=1000, flat_limit=2000)):
        for rows in (np.array([4, -1]), np.array([3000, 5])):
            with pytest.raises(ValueError, match="outside the index"):
                index.search(query, 3, allowed=rows)
            with pytest.raises(ValueError, match="outside the index"):
                index.scores(query, rows)
        assert index.search(query, 1, allowed=np.array([2999, 5]))[0].tolist() == [5]
        assert index.search(query, 3, allowed=np.array([], np.int64))[0].size == 0


@pytest.mark.parametrize(("per_image", "queries"), [(1, 1), (3, 1), (3, 4)])
def test_the_exact_tier_answers_as_faiss_flat_search_does(tmp_path, monkeypatch, per_image, queries):
    """The exact tier scans its vectors with numpy: the same rows and scores as FAISS' `IndexFlatIP`, over all
    rows and over a subset, from vectors in memory and mapped (unaligned) from the saved file in blocks."""
    import faiss

    from blipsearch.indexer import recall
    from blipsearch.indexer.recall import RecallIndex

    rng = np.random.default_rng(per_image + queries)
    vectors = rng.normal(size=(700, per_image, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    query = rng.normal(size=(queries, 32)).astype(np.float32)
    flat = faiss.IndexFlatIP(32)
    flat.add(vectors.reshape(-1, 32))

    def reference(k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Best image rows by FAISS: each image's best (vector, query vector) score, best first."""
        params = None
        if allowed is not None:
            ids = (allowed[:, None] * per_image + np.arange(per_image)).ravel()
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids))
        scores, ids = flat.search(query, flat.ntotal, params=params)
        best = {}
        for score, i in zip(scores.ravel(), ids.ravel(), strict=True):
            if i >= 0:
                best[i // per_image] = max(best.get(i // per_image, -np.inf), score)
        rows = sorted(best, key=lambda r: (-best[r], r))[:k]
        return np.array(rows), np.array([best[r] for r in rows], np.float32)

    built = RecallIndex.build(vectors)
    built.save(tmp_path)
    monkeypatch.setattr(recall, "SCAN_ROWS", 64)  # several blocks, the last one partial
    monkeypatch.setattr(recall, "SELECT_ROWS", 150)  # the best so far kept over several selections
    loaded = RecallIndex.load(tmp_path)
    assert isinstance(loaded.index, np.memmap) and not loaded.index.flags.aligned and loaded.kind == "exact"
    subset = rng.choice(700, 90, replace=False)
    for index in (built, loaded):
        for k, allowed in ((10, None), (700, None), (5, subset), (90, subset)):
            rows, scores = index.search(query if queries > 1 else query[0], k, allowed)
            expected_rows, expected_scores = reference(k, allowed)
            np.testing.assert_array_equal(rows, expected_rows)
            np.testing.assert_allclose(scores, expected_scores, atol=1e-6)


def test_the_exact_tier_is_saved_in_faiss_format_and_read_without_faiss(tmp_path, monkeypatch):
    """`recall.faiss` of the exact tier is FAISS' own `IndexFlatIP` file (other tools can read it); loading maps
    its vectors with numpy; a file of another layout goes through FAISS, or is refused if it is not one of
    ours."""
    import faiss

    from blipsearch.indexer import recall
    from blipsearch.indexer.recall import RecallIndex

    vectors = np.random.default_rng(1).normal(size=(50, 2, 8)).astype(np.float32)
    RecallIndex.build(vectors).save(tmp_path)
    theirs = faiss.read_index(str(tmp_path / "recall.faiss"))
    assert isinstance(theirs, faiss.IndexFlatIP)
    np.testing.assert_array_equal(theirs.reconstruct_n(0, 100), vectors.reshape(100, 8))
    loaded = RecallIndex.load(tmp_path)
    np.testing.assert_array_equal(loaded.index, vectors.reshape(100, 8))
    assert (loaded.count, loaded.vectors_per_image) == (50, 2)

    monkeypatch.setattr(recall, "_flat_vectors", lambda path: None)  # a layout this reader does not know
    through_faiss = RecallIndex.load(tmp_path)
    assert through_faiss.kind == "exact"
    np.testing.assert_array_equal(through_faiss.index, vectors.reshape(100, 8))
    monkeypatch.undo()

    other = faiss.IndexFlatL2(8)  # not a layout we write: refused, and the reader falls back to its tables
    other.add(vectors.reshape(100, 8))
    faiss.write_index(other, str(tmp_path / "recall.faiss"))
    assert recall._flat_vectors(tmp_path / "recall.faiss") is None and RecallIndex.load(tmp_path) is None
    RecallIndex.build(vectors).save(tmp_path)
    data = bytearray((tmp_path / "recall.faiss").read_bytes())
    (tmp_path / "recall.faiss").write_bytes(data[:-4])  # cut short
    assert recall._flat_vectors(tmp_path / "recall.faiss") is None and RecallIndex.load(tmp_path) is None


@pytest.mark.parametrize("queries", [1, 3])
def test_an_images_exact_score_does_not_depend_on_where_its_row_lies(tmp_path, monkeypatch, queries):
    """The same vectors in another row order (another index build, images added or removed): every image's
    ITC score to the last bit, from the scan in memory and mapped from the file in blocks, within a subset,
    and from `scores` of given rows alike."""
    from blipsearch.indexer import recall
    from blipsearch.indexer.recall import RecallIndex

    rng = np.random.default_rng(queries)
    vectors = rng.normal(size=(1001, 1, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    query = rng.normal(size=(queries, 64)).astype(np.float32).squeeze()
    order = rng.permutation(1001)
    first, second = RecallIndex.build(vectors), RecallIndex.build(vectors[order])
    rows, scores = first.search(query, 1001)
    moved_rows, moved_scores = second.search(query, 1001)
    by_image = dict(zip(order[moved_rows].tolist(), moved_scores.tolist(), strict=True))
    assert [by_image[r] for r in rows.tolist()] == scores.tolist()
    some = np.array([5, 999, 17])
    assert first.scores(query, some).tolist() == [by_image[r] for r in some.tolist()]
    first.save(tmp_path)
    monkeypatch.setattr(recall, "SCAN_ROWS", 300)  # blocks of 300 rows, the last one partial
    mapped = RecallIndex.load(tmp_path)
    assert isinstance(mapped.index, np.memmap)
    rows, scores = mapped.search(query, 1001)
    assert [by_image[r] for r in rows.tolist()] == scores.tolist()
    subset = np.arange(3, 1001, 7)
    rows, scores = mapped.search(query, 50, allowed=subset)
    assert set(rows.tolist()) <= set(subset.tolist()) and [by_image[r] for r in rows.tolist()] == scores.tolist()
