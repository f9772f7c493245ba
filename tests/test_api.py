"""The library API (`retrieval/api.py`): one opened index for the CLI, the server and the benchmarks."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from blipsearch.indexer import snapshot
from blipsearch.indexer.images import load_image
from blipsearch.indexer.reader import IndexReader
from blipsearch.retrieval.api import (
    FieldError,
    Index,
    NotIndexedError,
    Term,
    folders,
    more_terms,
    weighted,
    weighted_path,
)
from blipsearch.retrieval.errors import InvalidInputError, StoreError
from blipsearch.retrieval.search import SearchOptions

from photos import make_folder
from runner import assert_same_results, blipsearch, photo_library

QUERY = "a red dog on the beach"


@pytest.fixture(scope="module")
def library(tmp_path_factory, family_model_dir):
    return photo_library(tmp_path_factory.mktemp("api"), family_model_dir, {"a": 5, "b": 4})


@pytest.fixture(scope="module")
def index(library):
    return Index.open(library / "index", device="cpu", precision="fp32")


def test_search_answers_as_the_cli_does(library, index):
    cli = json.loads(blipsearch("query", QUERY, "--json", "--top", "6", "--precision", "fp32",
                                index=library / "index").stdout)
    results = index.search(QUERY, SearchOptions(top=6))
    assert_same_results([r.to_json() for r in results], cli["results"])
    for r in results:  # size and modification time come from the index, as the files were then
        st = os.stat(r.path)
        assert (r.size, r.mtime_ns) == (st.st_size, st.st_mtime_ns) and r.to_json(details=True)["size"] == r.size


def test_composed_itc_vector_is_the_normalised_weighted_sum(index):
    """A text with a subtracted text and an added image, without re-rank: ITC order by the composed vector."""
    model = index.model
    image = Path(sorted(index.reader.files())[0])
    terms = [Term(QUERY), Term("a cat", weight=-0.5), Term(image=image, weight=2.0)]
    got = index.search(terms, SearchOptions(top=9, rerank=False))
    texts = model.encode_texts([QUERY, "a cat"]).embeddings
    pixels = model.pixel_values([load_image(image, model.info.preprocessing).pixels])
    mean = model.encode_images(pixels).embeddings[0].mean(0)  # BLIP-2: 32 vectors -> their mean
    vector = texts[0] - 0.5 * texts[1] + 2.0 * mean / mean.norm()
    vector = (vector / vector.norm()).numpy()
    expected = index.reader.recall(vector, 9)
    paths = index.reader.paths_by_hash([h for h, _ in expected])
    assert [r.path for r in got] == [paths[h][0] for h, _ in expected]
    assert [r.itc for r in got] == pytest.approx([s for _, s in expected], abs=1e-5)
    assert all(r.itm_prob is None for r in got)


def test_composed_rerank_adds_and_subtracts_the_texts_itm_logits(index):
    """score = ITC(composed) + ITM logit of the positive text - weight x ITM logit of the negative one; the
    match probability is the positive text's."""
    model = index.model
    got = index.search([Term("a cat", weight=-0.5), Term(QUERY)], SearchOptions(top=9, candidates=9))
    keys = index.reader.files()
    features = torch.from_numpy(index.reader.token_features([keys[r.path] for r in got]))
    logits = [model.itm_scores(model.tokenize([t]), features) for t in (QUERY, "a cat")]
    expected = torch.tensor([r.itc for r in got]) + logits[0][:, 1] - 0.5 * logits[1][:, 1]
    assert [r.score for r in got] == pytest.approx(expected.tolist(), abs=1e-4)
    assert [r.itm_prob for r in got] == pytest.approx(logits[0].softmax(-1)[:, 1].tolist(), abs=1e-5)
    assert [r.score for r in got] == sorted((r.score for r in got), reverse=True)


def test_one_text_term_is_the_plain_query(index):
    plain, composed = index.search(QUERY), index.search([Term(QUERY)])
    assert [(r.path, r.score) for r in plain] == [(r.path, r.score) for r in composed]


def test_image_and_negative_texts_rank_by_itc_only(index):
    image = Path(sorted(index.reader.files())[2])
    got = index.search([Term(image=image), Term("a cat", weight=-1)], SearchOptions(top=3))
    assert all(r.itm_prob is None and r.score == r.itc for r in got)
    with pytest.raises(FieldError, match=r"^min_prob needs a text term"):
        index.search([Term(image=image), Term("a cat", weight=-1)], SearchOptions(min_prob=0.5))


def test_similar_finds_the_file_itself_first(index):
    path = sorted(index.reader.files())[3]
    first = index.similar(path)[0]
    assert first.path == path and first.score == pytest.approx(1.0, abs=1e-4)
    assert index.search_image(Path(path).read_bytes())[0].path == path  # an upload: the bytes
    assert index.search_image(bytearray(Path(path).read_bytes()))[0].path == path  # once taken for a path
    with pytest.raises(FieldError, match=r"^image cannot be read: ") as refused:
        index.search_image(bytearray(Path(path).read_bytes()[:200]))
    assert len(str(refused.value)) < 200  # the bytes themselves are not in it


def test_similar_and_indexed_terms_use_the_stored_vectors_without_reading_the_file(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    """It once encoded the file again: a file on an unmounted drive failed, and one overwritten since
    indexing was not first in its own answer."""
    from blipsearch.retrieval.api import Indexed

    make_folder(tmp_path / "photos", 4)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    index = Index.open(tmp_path / "index", device="cpu")
    path = str(tmp_path / "photos" / "img002.png")
    encoded = index.search_image(Path(path))  # the file, encoded
    Path(path).unlink()  # the drive is gone
    monkeypatch.setattr(index.model, "encode_images", lambda *_: pytest.fail("encoded an image"))
    stored = index.similar(path)
    assert stored[0].path == path and stored[0].score == pytest.approx(1, abs=1e-6)
    assert [r.path for r in stored] == [r.path for r in encoded]
    assert [r.score for r in stored] == pytest.approx([r.score for r in encoded], abs=1e-5)
    composed = index.search([Term(QUERY), Term(image=Indexed(path), weight=-0.5)])
    assert len(composed) == 4
    with pytest.raises(NotIndexedError, match="is not in the index"):
        index.search([Term(image=Indexed(str(tmp_path / "elsewhere.png")))])


def test_an_index_location_with_a_nul_byte_is_bad_input_not_damage(tmp_path):
    with pytest.raises(InvalidInputError, match="holds a NUL byte: name a folder"):
        Index.open(str(tmp_path / "x\0y"))


def test_errors_name_fields(index, tmp_path):
    with pytest.raises(NotIndexedError, match="is not in the index"):
        index.similar(str(tmp_path / "nowhere.png"))
    with pytest.raises(FieldError, match=r"^under .*: no such folder"):
        folders(tmp_path / "missing")
    with pytest.raises(FieldError, match=r"^image .*: ") as caught:
        index.search_image(b"no image at all")
    assert caught.value.field == "image"
    for weight in (float("nan"), float("inf"), 0, 1e39, -1e4, 1e-4, "2"):
        with pytest.raises(FieldError, match=r"^weight must be a number of size 0.001 to 1000"):
            Term("x", weight=weight)
    assert Term("x", weight=-1000).weight == -1000 and Term("x", weight=0.001).weight == 0.001
    with pytest.raises(InvalidInputError, match="cancel out"):
        index.search([Term(QUERY), Term(QUERY, weight=-1)])
    with pytest.raises(InvalidInputError, match="no terms"):
        index.search([])


def test_arguments_of_the_wrong_type_are_field_errors(index, library):
    """Each was an AttributeError or TypeError from inside the search."""
    for query in (["a red dog", "blue"], b"a red dog", None, 5):
        with pytest.raises(FieldError, match=r"^query must be a text, or a list of Term"):
            index.search(query)
    with pytest.raises(FieldError, match=r"^options must be Options\(...\), not dict"):
        index.search(QUERY, {"top": 3})
    with pytest.raises(FieldError, match=r"^text must be a text, not int"):
        Term(text=5)
    with pytest.raises(FieldError, match=r"^image must be a file path, the image's bytes or an Indexed file"):
        index.search_image(5)
    with pytest.raises(FieldError, match=r"^words must be a text, not int"):
        index.keyword_search(5)
    with pytest.raises(FieldError, match=r"^path must be a file path, not int"):
        index.similar(5)
    assert len(index.search(t for t in [Term(QUERY)])) == len(index.search(QUERY))  # any iterable of terms
    path = library / "photos" / "a" / "img000.png"  # a Path names the indexed file as its text does
    assert [r.path for r in index.similar(path)] == [r.path for r in index.similar(str(path))]
    assert index.indexed(path) == index.indexed(str(path))
    # options, dates and opening: AttributeErrors and TypeErrors, or (rerank="no", truthy) silently re-ranked
    from blipsearch.retrieval.dates import date_range

    for make, message in ((lambda: SearchOptions(keyword=5), r"^keyword must be a text, not int"),
                          (lambda: SearchOptions(rerank="no"), r"^rerank must be True or False, not 'no'"),
                          (lambda: SearchOptions(hybrid="x"), r"^hybrid must be True or False"),
                          (lambda: date_range(2019, 2020), r"^after must be a date as text"),
                          (lambda: date_range(None, b"2019"), r"^before must be a date as text"),
                          (lambda: index.indexed(None), r"^path must be a file path, not NoneType"),
                          (lambda: Index.open(123), r"^location must be a path"),
                          (lambda: Index.open(library / "index", model=5), r"^model must be a path"),
                          (lambda: Index.open(library / "index", device=None), r"^device must be one of auto"),
                          (lambda: folders(None), r"^under must name a folder"),
                          (lambda: index.holds_under("/"), r"^under must be a list of absolute folder paths"),
                          (lambda: index.holds_under(["photos"]), r"^under must be a list of absolute folder paths"),
                          (lambda: folders("~nosuchuser-b/x"), r"^under ~nosuchuser-b/x: no such folder")):
        with pytest.raises(FieldError, match=message):
            make()
    assert Term(QUERY, weight=np.float32(2)).weight == 2  # numpy numbers, as np.float64 already was


def test_weighted_term_syntax():
    assert weighted("2:sunset") == (2.0, "sunset")
    assert weighted("0.5:a:b") == (0.5, "a:b")
    assert weighted("time: 5pm") == (1.0, "time: 5pm")
    assert weighted("sunset") == (1.0, "sunset")
    assert weighted("1:10:30 meeting") == (1.0, "10:30 meeting")  # a text that begins "N:" has its weight written


def test_a_bad_added_term_names_its_field_and_a_blank_text_is_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "12:30.png").write_bytes(b"")
    assert weighted_path("12:30.png") == (1.0, "12:30.png") and weighted_path("2:12:30.png") == (2.0, "12:30.png")
    monkeypatch.setenv("HOME", "/home/me")
    assert weighted_path("0.5:~/a.jpg") == (0.5, "/home/me/a.jpg")
    for given, message in (({"add": ["red", ""]}, "^add text is empty"), ({"subtract": ["\u200b "]}, "^subtract text"),
                           ({"add_images": ["2: "]}, "^add_images path is empty"),
                           ({"subtract_images": ["1e9:x.png"]}, "^subtract_images weight must be")):
        with pytest.raises(FieldError, match=message):
            more_terms(**given)
    with pytest.raises(InvalidInputError, match=r"^the query text is empty"):
        Term("\u200b\u2060 \t")  # invisible characters only: nothing to match


def test_a_finished_run_in_another_process_is_picked_up(tmp_path, tiny_model_dir):
    make_folder(tmp_path / "photos", 2)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    index = Index.open(tmp_path / "index", device="cpu")
    assert not index.refresh() and index.status()["files"] == 2
    make_folder(tmp_path / "more", 3, seed=9)
    blipsearch("index", str(tmp_path / "more"), "-q", index=tmp_path / "index")
    assert index.refresh()
    assert len(index.search(QUERY, SearchOptions(top=10))) == 5 and not index.refresh()


def test_a_rebuild_is_picked_up_where_its_generation_matches_the_one_open(tmp_path, tiny_model_dir):
    """A --rebuild counts generations from 1 again: its build id, not the generation, tells it apart."""
    from blipsearch.indexer.manifest import read_manifest

    make_folder(tmp_path / "photos", 2)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    index = Index.open(tmp_path / "index", device="cpu")
    first = read_manifest(tmp_path / "index").run
    make_folder(tmp_path / "other", 3, seed=5)
    blipsearch("index", str(tmp_path / "other"), "--rebuild", "--model", str(tiny_model_dir), "-q",
               index=tmp_path / "index")
    rebuilt = read_manifest(tmp_path / "index")
    assert rebuilt.run.generation == first.generation and rebuilt.run.build != first.build
    assert index.refresh() and index.status()["files"] == 3 and not index.refresh()
    assert {Path(r.path).parent.name for r in index.search(QUERY, SearchOptions(top=10))} == {"other"}



def test_an_open_index_answers_from_a_rebuild_made_since_without_being_refreshed(tmp_path, tiny_model_dir):
    """An index opened but not yet searched mapped the rebuilt index's feature segments (numbered from 1
    again) under its old view: other images' features, scores of -3 for the best match, no error."""
    make_folder(tmp_path / "photos", 2)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    index = Index.open(tmp_path / "index", device="cpu")
    make_folder(tmp_path / "other", 3, seed=5)
    blipsearch("index", str(tmp_path / "other"), "--rebuild", "-q", index=tmp_path / "index")
    assert {Path(r.path).parent.name for r in index.search(QUERY, SearchOptions(top=10))} == {"other"}
    fresh = Index.open(tmp_path / "index", device="cpu")
    ours, theirs = (i.search(QUERY, SearchOptions(top=10)) for i in (index, fresh))
    assert [(r.path, r.score) for r in ours] == [(r.path, r.score) for r in theirs]


def test_a_query_during_which_a_rebuild_began_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    """Its features may come from the rebuild's new segments: an error, never mixed results."""
    from blipsearch.indexer.manifest import read_manifest, write_manifest

    make_folder(tmp_path / "photos", 2)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    index = Index.open(tmp_path / "index", device="cpu")
    reader, fetch = index.reader, index.reader.token_features

    def rebuild_begins(hashes):
        manifest = read_manifest(tmp_path / "index")
        manifest.run.build, manifest.run.generation, manifest.run.writing = "another", 0, True
        write_manifest(tmp_path / "index", manifest)
        return fetch(hashes)

    monkeypatch.setattr(reader, "token_features", rebuild_begins)
    with pytest.raises(StoreError, match="was rebuilt while this query ran; ask again"):
        index.search(QUERY)
    assert len(index.search(QUERY)) == 2  # the next query opens the index anew (here its tables are unchanged)


def test_a_one_shot_search_reads_the_manifest_once_less_and_still_refuses_a_rebuild_begun_since(
        tmp_path, tiny_model_dir, monkeypatch):
    """`blipsearch query` opens and searches at once: re-reading the manifest between the two (a GET on object
    storage) told it nothing; the check after the features were read stays, and later searches refresh."""
    from blipsearch.indexer import layout
    from blipsearch.indexer import reader as reader_module
    from blipsearch.retrieval import api

    make_folder(tmp_path / "photos", 2)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    reads = []
    original = layout.read_index_manifest
    counted = lambda path: reads.append(path) or original(path)  # noqa: E731
    monkeypatch.setattr(layout, "read_index_manifest", counted)
    monkeypatch.setattr(reader_module, "read_index_manifest", counted)
    monkeypatch.setattr(api, "FRESH_VIEW_S", 3600.0)  # however slow this machine
    for one_shot, expected in ((False, 3), (True, 2)):  # open, (refresh), the build check after the features
        reads.clear()
        index = Index.open(tmp_path / "index", device="cpu", one_shot=one_shot)
        assert len(index.search(QUERY)) == 2 and len(reads) == expected
    monkeypatch.setattr(api, "FRESH_VIEW_S", 0.0)  # a first search long after its open refreshes as any does
    reads.clear()
    index = Index.open(tmp_path / "index", device="cpu", one_shot=True)
    assert len(index.search(QUERY)) == 2 and len(reads) == 3
    monkeypatch.setattr(api, "FRESH_VIEW_S", 3600.0)
    reads.clear()
    assert len(index.search(QUERY)) == 2 and len(reads) == 2  # the next search refreshes (and checks) as any does
    index = Index.open(tmp_path / "index", device="cpu", one_shot=True)
    make_folder(tmp_path / "other", 3, seed=5)
    blipsearch("index", str(tmp_path / "other"), "--rebuild", "-q", index=tmp_path / "index")
    with pytest.raises(StoreError, match="was rebuilt while this query ran; ask again"):
        index.search(QUERY)
    assert {Path(r.path).parent.name for r in index.search(QUERY, SearchOptions(top=10))} == {"other"}


def test_a_new_index_reads_as_a_run_under_way_from_its_first_moment(tmp_path, tiny_model_dir, monkeypatch):
    """Between its manifest and its tables (~1 s) a new index read as finished and empty: a reader that opened
    it then said "add images" for the whole first run (a refresh keeps a view while a run is under way)."""
    from blipsearch.indexer import store
    from blipsearch.retrieval.models import load_model

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store._Tables, "read", killed)
    with pytest.raises(KeyboardInterrupt):
        store.IndexWriter.open(tmp_path / "index", load_model(str(tiny_model_dir), "cpu", "fp32").info)
    monkeypatch.undo()
    with pytest.raises(StoreError, match="no images yet: its first indexing run"):
        Index.open(tmp_path / "index", device="cpu").search(QUERY)
    make_folder(tmp_path / "photos", 2)
    blipsearch("index", str(tmp_path / "photos"), "-q", index=tmp_path / "index")
    assert len(Index.open(tmp_path / "index", device="cpu").search(QUERY)) == 2


def test_an_index_whose_first_run_stored_nothing_yet_says_so(tmp_path, tiny_model_dir):
    """As a --rebuild (or a first run) leaves it before its first images are stored: a StoreError (the server's
    503), not the empty index's "add images"."""
    from blipsearch.indexer.store import IndexWriter
    from blipsearch.retrieval.models import load_model

    IndexWriter.open(tmp_path / "index", load_model(str(tiny_model_dir), "cpu", "fp32").info).close()
    index = Index.open(tmp_path / "index", device="cpu")
    with pytest.raises(StoreError, match="no images yet: its first indexing run"):
        index.search(QUERY)
    with pytest.raises(StoreError, match="no images yet: its first indexing run"):  # was "not in the index"
        index.indexed(str(tmp_path / "photos" / "a.png"))  # (the server's thumbnails and originals: 404s)


def test_a_first_run_under_way_answers_from_what_it_stored_and_the_cli_says_so(tmp_path, tiny_model_dir):
    """README promised a StoreError for the whole first run while searches answered from its first batches
    without a word; they answer (a long first run is searchable), and say so."""
    from blipsearch.indexer.pipeline import IndexOptions, index_folders
    from blipsearch.indexer.store import IndexWriter
    from blipsearch.retrieval.models import load_model

    class Unfinished:  # a first run whose batches are stored, and which has not finished
        def __init__(self, store):
            self.store = store

        def __getattr__(self, name):
            return getattr(self.store, name)

        def finish(self):
            pass

    make_folder(tmp_path / "photos", 3)
    model = load_model(str(tiny_model_dir), "cpu", "fp32")
    store = IndexWriter.open(tmp_path / "index", model.info)
    try:
        index_folders([tmp_path / "photos"], model, Unfinished(store), IndexOptions(batch_size=2, progress=False))
    finally:
        store.close()
    index = Index.open(tmp_path / "index", device="cpu")
    assert index.building and len(index.search(QUERY)) == 3
    result = blipsearch("query", QUERY, "--paths", index=tmp_path / "index")
    assert len(result.stdout.splitlines()) == 3
    assert result.stderr.strip() == ("blipsearch: the index's first run (or a --rebuild) is under way, or stopped: "
                                     "these results come from the 3 images it has stored")
    blipsearch("index", str(tmp_path / "photos"), "-q", index=tmp_path / "index")
    assert not Index.open(tmp_path / "index", device="cpu").building


def test_a_new_index_stopped_before_making_its_tables_is_empty_not_damaged(tmp_path, tiny_model_dir):
    """Ctrl-C while the model loaded leaves the manifest alone: status and query called that damaged (and asked
    for --rebuild), though a plain run finishes it."""
    from blipsearch.indexer.manifest import Manifest, write_manifest
    from blipsearch.retrieval.api import index_status
    from blipsearch.retrieval.models import load_model

    (tmp_path / "index").mkdir()
    write_manifest(tmp_path / "index", Manifest.new(load_model(str(tiny_model_dir), "cpu", "fp32").info))
    report, damage = index_status(tmp_path / "index")
    assert damage is None and (report["files"], report["snapshot"]) == (0, None)
    with pytest.raises(InvalidInputError, match="is empty; add images"):
        Index.open(tmp_path / "index", device="cpu").search(QUERY)
    make_folder(tmp_path / "photos", 2)
    blipsearch("index", str(tmp_path / "photos"), "-q", index=tmp_path / "index")
    assert index_status(tmp_path / "index")[0]["files"] == 2


def test_a_view_older_than_the_last_generation_is_rebuilt_while_a_run_is_under_way(tmp_path, tiny_model_dir):
    """A run deletes the segments the generation before the last retired: a view that old reads the tables."""
    from blipsearch.indexer.manifest import read_manifest, write_manifest

    make_folder(tmp_path / "photos", 2)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    index = Index.open(tmp_path / "index", device="cpu")
    make_folder(tmp_path / "more", 1, seed=4)
    blipsearch("index", str(tmp_path / "more"), "-q", index=tmp_path / "index")
    manifest = read_manifest(tmp_path / "index")
    manifest.run.writing = True  # as a third run under way leaves it
    write_manifest(tmp_path / "index", manifest)
    assert index.refresh() and not index.reader.from_snapshot and index.status()["files"] == 3
    assert not index.refresh()  # the same run still under way: this view stays
    manifest.run.writing = False
    write_manifest(tmp_path / "index", manifest)
    assert index.refresh() and index.reader.from_snapshot


def test_an_older_snapshot_format_counts_as_absent(tmp_path, tiny_model_dir):
    """Readers then read the tables, and the next indexing run (even with nothing new) rewrites it."""
    make_folder(tmp_path / "photos", 2)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    meta_file = tmp_path / "index" / snapshot.FOLDER / "snapshot.json"
    meta = json.loads(meta_file.read_text())
    assert meta["format"] == snapshot.FORMAT
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "format"}))  # as format 1 wrote it
    assert snapshot.saved_generation(tmp_path / "index") is None
    reader = IndexReader.open(tmp_path / "index")
    assert not reader.from_snapshot and reader.counts() == (2, 2)
    sizes = [f.size for files in reader.files_by_hash(list(reader.files().values())).values() for f in files]
    assert sorted(sizes) == sorted(p.stat().st_size for p in (tmp_path / "photos").iterdir())
    blipsearch("index", str(tmp_path / "photos"), "-q", index=tmp_path / "index")
    assert snapshot.saved_generation(tmp_path / "index") == meta["generation"] + 1
    assert IndexReader.open(tmp_path / "index").from_snapshot


def test_blip2_image_terms_enter_as_the_mean_of_their_vectors(tiny_blip2_dir, tmp_path):
    """Stated rule: a BLIP-2 image term in a composed query is its 32 vectors' normalised mean."""
    make_folder(tmp_path / "photos", 3)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_blip2_dir), "-q", index=tmp_path / "index")
    index = Index.open(tmp_path / "index", device="cpu", precision="fp32")
    image = sorted(index.reader.files())[0]
    composed = index.search([Term(image=Path(image)), Term(image=Path(image))], SearchOptions(top=3))
    pixels = index.model.pixel_values([load_image(image, index.model.info.preprocessing).pixels])
    mean = index.model.encode_images(pixels).embeddings[0].mean(0)
    expected = index.reader.recall((mean / mean.norm()).numpy(), 3)
    assert [r.itc for r in composed] == pytest.approx([s for _, s in expected], abs=1e-5)
    assert np.isfinite([r.score for r in composed]).all()


def test_the_cli_composes_as_the_api_does(library, index):
    image = sorted(index.reader.files())[1]
    cli = json.loads(blipsearch("query", QUERY, "--add", "2:sunset", "--subtract", "people", "--subtract-image",
                                f"0.5:{image}", "--json", "--precision", "fp32", index=library / "index").stdout)
    terms = [Term(QUERY), Term("sunset", weight=2), Term("people", weight=-1), Term(image=Path(image), weight=-0.5)]
    assert cli["results"] == [r.to_json() for r in index.search(terms)]
    result = blipsearch("query", QUERY, "--add", "inf:x", index=library / "index", expect=1)
    assert "--add weight must be a number of size 0.001 to 1000" in result.stderr
    result = blipsearch("query", QUERY, "--top", "3", "--in", str(library / "nowhere"), index=library / "index",
                        expect=1)
    assert "--in " + str(library / "nowhere") + ": no such folder" in result.stderr


def test_a_lazy_index_loads_its_model_at_the_first_search_that_needs_one(library, index):
    lazy = Index.open(library / "index", device="cpu", precision="fp32", lazy=True)
    assert lazy.keyword_search("img000") and lazy._model is None and lazy.model_id == index.model_id
    some = sorted(index.reader.files())[0]
    assert lazy.similar(some) == index.similar(some) and lazy._model is None  # stored vectors alone
    assert lazy.search(QUERY) == index.search(QUERY) and lazy._model is not None
