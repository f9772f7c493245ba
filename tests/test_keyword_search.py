"""Keyword and hybrid search, dates and sorting, as users reach them: `index --captions` with a tiny BLIP
captioner, `query --keyword/--after/--before/--sort/--hybrid`, the library API and the server; and the
fusion rule against a fake index."""

import json
import os
from datetime import datetime

import numpy as np
import pytest

from blipsearch.retrieval.errors import InvalidInputError
from blipsearch.retrieval.search import Filters, Searcher, SearchOptions, rrf_scores

from photos import exif_photo, make_folder
from runner import blipsearch, one_line_error
from tiny import save_tiny_blip


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("tiny-captioner"), model_class="BlipForConditionalGeneration")


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model_dir, captioner_dir):
    """Photos named by what they show and dated by EXIF (2018, 2019, 2019-12, 2021), plus undated ones;
    indexed with captions."""
    root = tmp_path_factory.mktemp("keywords")
    photos = root / "photos"
    for seed, (name, taken) in enumerate([("beach_dog", "2018:07:01 12:00:00"), ("beach-sunset", "2019:05:04 18:00:00"),
                                          ("Zürich café", "2019:12:31 23:59:59"), ("dog park", "2021:03:03 09:00:00")]):
        exif_photo(photos / f"{name}.jpg", seed, taken)
    make_folder(photos / "misc", 3, seed=9)
    os.utime(photos / "misc" / "img000.png", (0, 1_600_000_000))  # 2020-09-13: dated by its file time
    blipsearch("index", str(photos), "--model", str(tiny_model_dir), "--captions", "--captioner", str(captioner_dir),
               "-q", index=root / "index")
    return root


def query(library, *args, expect=0):
    return blipsearch("query", *args, index=library / "index", expect=expect)


def names(result) -> list[str]:
    return [os.path.basename(r["path"]) for r in json.loads(result.stdout)["results"]]


def test_captions_reach_the_json_the_table_and_status(library, captioner_dir):
    rows = json.loads(query(library, "a dog", "--json").stdout)["results"]
    assert len(rows) == 7 and all(isinstance(r["caption"], str) and r["caption"] for r in rows)
    table = query(library, "a dog").stdout.splitlines()
    assert table[0].endswith("-- caption") and all(" -- " in line for line in table[1:])
    status = json.loads(blipsearch("status", "--json", index=library / "index").stdout)
    assert status["captions"] == 7 and status["captioner"] == str(captioner_dir)


def test_keyword_filters_and_ranks_with_punctuation_and_accents(library):
    assert sorted(names(query(library, "a picture", "--keyword", "beach", "--json"))) == \
        ["beach-sunset.jpg", "beach_dog.jpg"]
    assert names(query(library, "--keyword", "dog beach", "--json")) == ["beach_dog.jpg"]  # every word
    assert names(query(library, "--keyword", "zurich", "--json")) == ["Zürich café.jpg"]
    assert names(query(library, "--keyword", "CAFÉ", "--json")) == ["Zürich café.jpg"]
    keyword_only = json.loads(query(library, "--keyword", "dog", "--json").stdout)["results"]
    assert [r["itc"] for r in keyword_only] == [None, None] and keyword_only[0]["score"] > 0
    assert names(query(library, "--keyword", "giraffe", "--json")) == []


def test_a_keyword_that_matches_one_copy_shows_that_copy(tmp_path, tiny_model_dir):
    """Copies of one picture are one image: `--keyword dup_b --paths` printed whichever copy came first."""
    from shutil import copy

    make_folder(tmp_path / "photos", 1)
    for name in ("dup_a.png", "dup_b.png", "Zürich.png"):
        copy(tmp_path / "photos" / "img000.png", tmp_path / "photos" / name)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    for word in ("dup_b", "zurich", "dup a"):
        shown = blipsearch("query", "--keyword", word, "--paths", index=tmp_path / "index").stdout.splitlines()
        assert shown == [str(tmp_path / "photos" / {"dup_b": "dup_b.png", "zurich": "Zürich.png",
                                                    "dup a": "dup_a.png"}[word])]


def test_dates_filter_and_sort(library):
    in_2019 = names(query(library, "a photo", "--after", "2019", "--before", "2020", "--json"))
    assert sorted(in_2019) == ["Zürich café.jpg", "beach-sunset.jpg"]
    assert names(query(library, "a photo", "--after", "2019-12-31T23:59", "--before", "2020", "--json")) == \
        ["Zürich café.jpg"]
    file_dated = names(query(library, "a photo", "--after", "2020-09-13", "--before", "2020-09-14", "--json"))
    assert file_dated == ["img000.png"]
    dated = json.loads(query(library, "a photo", "--before", "2022", "--sort", "date", "--json").stdout)["results"]
    dates = [r["date"] for r in dated]
    assert dates == sorted(dates, reverse=True) and len(dated) == 5
    assert dated[0]["date"] == "2021-03-03T09:00:00" and dated[0]["date_source"] == "exif"
    assert {r["date_source"] for r in dated} == {"exif", "file"}
    assert datetime.fromisoformat(dated[-1]["date"]).year == 2018


@pytest.mark.parametrize("args, fragments", [
    (["a", "--after", "May 2019"], ["--after", "YYYY-MM-DD"]),
    (["a", "--after", "2020", "--before", "2019"], ["--before must be a later date than the start (2020)"]),
    (["a", "--keyword", "  "], ["--keyword", "empty"]),
    (["a", "--keyword", "\udcff dog"], ["--keyword is not valid UTF-8"]),  # argv bytes of Latin-1: dropped unsaid
    (["--keyword", "!!!"], ["no word"]),
    ([], ["TEXT", "--keyword"]),
])
def test_bad_keyword_and_date_arguments_are_one_line(library, args, fragments):
    one_line_error(query(library, *args, expect=1), *fragments)


def test_the_captioner_is_remembered_and_can_be_turned_off(tmp_path, tiny_model_dir, captioner_dir):
    make_folder(tmp_path / "photos", 2)
    index = tmp_path / "index"
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "--captioner", str(captioner_dir),
               "-q", index=index)
    make_folder(tmp_path / "photos" / "more", 1, seed=5)
    out = blipsearch("index", str(tmp_path / "photos"), "-q", index=index).stderr
    assert "captioned 1" in out
    status = json.loads(blipsearch("status", "--json", index=index).stdout)
    assert status["captions"] == 3
    make_folder(tmp_path / "photos" / "later", 1, seed=6)
    blipsearch("index", str(tmp_path / "photos"), "--no-captions", "-q", index=index)
    status = json.loads(blipsearch("status", "--json", index=index).stdout)
    assert (status["captions"], status["images"], status["captioner"]) == (3, 4, None)


def test_a_missing_captioner_is_one_line(tmp_path, tiny_model_dir):
    make_folder(tmp_path / "photos", 1)
    result = blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "--captioner",
                        str(tmp_path / "nowhere"), "-q", index=tmp_path / "index", expect=1)
    one_line_error(result, "nowhere")


def test_api_and_server_take_the_same_options(library, tiny_model_dir):
    from fastapi.testclient import TestClient

    from blipsearch.retrieval.api import Index, Options
    from blipsearch.retrieval.server.app import create_app

    index = Index.open(library / "index", device="cpu", precision="fp32")
    found = index.keyword_search("beach", Options(top=5))
    assert sorted(os.path.basename(r.path) for r in found) == ["beach-sunset.jpg", "beach_dog.jpg"]
    client = TestClient(create_app(index, library / "cache"), base_url="http://127.0.0.1")
    answer = client.get("/api/search", params={"q": "a dog", "after": "2019", "before": "2020", "sort": "date"})
    assert answer.status_code == 200, answer.text
    rows = answer.json()["results"]
    assert [os.path.basename(r["path"]) for r in rows] == ["Zürich café.jpg", "beach-sunset.jpg"]
    assert all(r["caption"] and r["camera"] == "Canon EOS 5D" for r in rows)
    assert client.get("/api/search", params={"keyword": "dog"}).json()["results"][0]["itc"] is None
    bad = client.get("/api/search", params={"q": "a", "after": "soon"})
    assert bad.status_code == 400 and "after" in bad.json()["error"]


class FakeSource:
    """An index of 6 images: vectors e_i (one-hot), keyword hits as given, features that make ITM flat."""

    has_captions = True

    def __init__(self, keyword: list[str]):
        self.keyword = keyword
        self.similarity_asked: list[str] = []

    def recall(self, query, k, where=None):
        order = np.argsort(-query, kind="stable")[:k]
        return [(f"k{i}", float(query[i])) for i in order]

    def similarity(self, query, keys):
        self.similarity_asked += list(keys)
        return {key: float(query[int(key[1:])]) for key in keys}

    def keyword_hits(self, text, k, where=None):
        return [(key, 10.0 - i) for i, key in enumerate(self.keyword[:k])]


def test_rrf_sums_reciprocal_ranks_and_keeps_first_appearance_on_ties():
    # c: 1/63 + 1/61 = 0.032266 > b: 2/62 = 0.032258 > a: 1/61
    assert list(rrf_scores(["a", "b", "c"], ["c", "b"])) == ["c", "b", "a"]
    assert list(rrf_scores(["a", "b"], ["b", "a"])) == ["a", "b"]  # equal sums: the first ranking's order
    assert list(rrf_scores(["x"], [])) == ["x"]


def test_hybrid_search_adds_keyword_hits_to_the_vector_candidates_with_their_itc():
    query = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.0], np.float32)
    source = FakeSource(keyword=["k5", "k4", "k3"])
    searcher = Searcher(model=None, source=source)
    vector_only = searcher.search_vector(query, [], SearchOptions(top=3, candidates=3, hybrid=False), words="x")
    assert [h.key for h in vector_only] == ["k0", "k1", "k2"]
    # 8 candidates: the vector list keeps all 6 images, 2 keyword hits (8 // 4) are asked for
    fused = searcher.search_vector(query, [], SearchOptions(top=6, candidates=8), words="x")
    # no re-rank: reciprocal-rank order; k5 (1/66 + 1/61) and k4 (1/65 + 1/62) are in both lists, k0 (1/61) not
    assert [h.key for h in fused][:4] == ["k5", "k4", "k0", "k1"]
    assert [h.score for h in fused] == sorted((h.score for h in fused), reverse=True)
    assert source.similarity_asked == []  # both hits were vector candidates already
    small = searcher.search_vector(query, [], SearchOptions(top=5, candidates=4), words="x")
    assert {h.key for h in small} == {"k0", "k1", "k2", "k3", "k5"}  # 4 vector candidates + 1 keyword hit
    assert {h.key: h.itc for h in small}["k5"] == pytest.approx(0.0)
    assert source.similarity_asked == ["k5"]
    assert [h.key for h in searcher.search_vector(query, [], SearchOptions(top=3), words=None)] == ["k0", "k1", "k2"]


def test_filters_and_options_are_checked():
    assert Filters().empty and not Filters(keyword="dog").empty
    with pytest.raises(InvalidInputError, match="sort"):
        SearchOptions(sort="name")
    with pytest.raises(InvalidInputError, match="before"):
        SearchOptions(after=10, before=10)


def test_a_keyword_search_loads_no_model(tmp_path, tiny_model_dir):
    """README says a keyword search involves no model; it loaded one, and failed where that had moved away."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    make_folder(tmp_path / "photos" / "beach", 2)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(model), "-q", index=tmp_path / "index")
    model.rename(tmp_path / "moved")
    found = json.loads(blipsearch("query", "--keyword", "beach", "--json", index=tmp_path / "index").stdout)
    assert (found["model"], len(found["results"])) == (str(model), 2)
    one_line_error(blipsearch("query", "a beach", index=tmp_path / "index", expect=1), str(model), "neither")
