"""The `blipsearch` command as users run it: output formats, options, errors and exit statuses."""

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, BlipForImageTextRetrieval, BlipImageProcessorPil

from blipsearch.retrieval.api import Index

from photos import make_folder
from runner import blipsearch, one_line_error, photo_library
from tiny import save_tiny_blip

QUERY = "a red dog on the beach"


@pytest.fixture(scope="module")
def library(tmp_path_factory, family_model_dir):
    """Two folders indexed with the tiny model of each family: the tests that take it run once per family."""
    return photo_library(tmp_path_factory.mktemp("cli"), family_model_dir, {"trips": 5, "family": 4})


def query_json(library, *args):
    out = blipsearch("query", QUERY, "--json", *args, index=library / "index").stdout
    return json.loads(out)


def test_json_schema(library, family_model_dir):
    answer = query_json(library, "--top", "4")
    assert set(answer) == {"query", "model", "results"}
    assert answer["query"] == QUERY and answer["model"] == str(family_model_dir)
    assert len(answer["results"]) == 4
    for row in answer["results"]:
        assert set(row) == {"path", "score", "itc", "itm_prob", "caption", "date", "date_source"}
        assert 0 <= row["itm_prob"] <= 1 and -1 <= row["itc"] <= 1
        assert row["caption"] is None and row["date_source"] == "file"  # no --captions; PNGs without EXIF
        assert datetime.fromisoformat(row["date"]).year >= 2026
    assert [r["score"] for r in answer["results"]] == sorted((r["score"] for r in answer["results"]), reverse=True)
    no_rerank = query_json(library, "--no-rerank")["results"]
    assert all(r["itm_prob"] is None and r["score"] == r["itc"] for r in no_rerank)


def test_paths_in_and_min_prob(library):
    full = query_json(library, "--top", "9", "--candidates", "9")["results"]
    paths = blipsearch("query", QUERY, "--paths", "--top", "9", "--candidates", "9",
                       index=library / "index").stdout.splitlines()
    assert paths == [r["path"] for r in full]
    family = str(library / "photos" / "family")
    under = query_json(library, "--in", family, "--top", "9")["results"]
    assert [r["path"] for r in under] == [r["path"] for r in full if r["path"].startswith(family + "/")]
    probs = sorted(r["itm_prob"] for r in full)
    threshold = (probs[3] + probs[4]) / 2  # between two results, clear of the JSON rounding
    kept = query_json(library, "--min-prob", str(threshold), "--top", "9", "--candidates", "9")["results"]
    assert [r["path"] for r in kept] == [r["path"] for r in full if r["itm_prob"] >= threshold]


def test_in_a_folder_gone_since_it_was_indexed_searches_its_indexed_files(tmp_path, tiny_model_dir):
    """An unplugged drive's (or a deleted folder's) files stay in the index until a run removes them: `--in`
    such a folder answers from them; a folder the index holds nothing from is still refused in one line."""
    photos = tmp_path / "photos"
    make_folder(photos / "drive", 3, seed=1)
    make_folder(photos / "home", 3, seed=2)
    blipsearch("index", str(photos), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    make_folder(tmp_path / "media" / "pictures", 2, seed=3)  # a root reached through a link: stored by its target
    (tmp_path / "linked").symlink_to(tmp_path / "media" / "pictures")
    blipsearch("index", str(tmp_path / "linked"), "-q", index=tmp_path / "index")
    (photos / "drive").rename(tmp_path / "unplugged")
    (tmp_path / "media" / "pictures").rename(tmp_path / "unplugged-too")  # the link now dangles
    out = blipsearch("query", QUERY, "--in", str(photos / "drive"), "--paths", index=tmp_path / "index").stdout
    assert sorted(out.splitlines()) == [str(photos / "drive" / f"img{i:03d}.png") for i in range(3)]
    out = blipsearch("query", QUERY, "--in", str(tmp_path / "linked"), "--paths", index=tmp_path / "index").stdout
    assert sorted(out.splitlines()) == [str(tmp_path / "media" / "pictures" / f"img{i:03d}.png") for i in range(2)]
    for missing in (photos / "dri", tmp_path / "nowhere"):  # a prefix of a name is not its folder
        one_line_error(blipsearch("query", QUERY, "--in", str(missing), index=tmp_path / "index", expect=1),
                       f"--in {missing}: no such folder, and the index holds no files under it")
    one_line_error(blipsearch("query", QUERY, "--in", str(photos / "home" / "img000.png"), index=tmp_path / "index",
                              expect=1), "--in", "img000.png: no such folder")  # a file: refused as before


def test_table_output_and_status(library, family_model_dir):
    lines = blipsearch("query", QUERY, "--top", "3", index=library / "index").stdout.splitlines()
    assert lines[0].split() == ["#", "score", "match", "date", "path"] and len(lines) == 4
    assert lines[1].split()[0] == "1" and lines[1].split()[2].endswith("%")
    status = json.loads(blipsearch("status", "--json", index=library / "index").stdout)
    assert (status["files"], status["images"], status["model"]) == (9, 9, str(family_model_dir))
    assert status["bytes"] > 0
    text = blipsearch("status", index=library / "index").stdout
    assert "9 files, 9 distinct images" in text


def test_query_by_image_finds_the_image_itself(library):
    target = library / "photos" / "family" / "img002.png"
    answer = json.loads(blipsearch("query", "--image", str(target), "--json", index=library / "index").stdout)
    assert answer["results"][0]["path"] == str(target)
    assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_copies_are_listed_once(tmp_path, tiny_model_dir):
    a = make_folder(tmp_path / "photos", 2)[0]
    (tmp_path / "photos" / "again.png").write_bytes(a.read_bytes())
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    answer = json.loads(blipsearch("query", "--image", str(a), "--json", index=tmp_path / "index").stdout)
    assert len(answer["results"]) == 2
    assert answer["results"][0]["path"] == str(tmp_path / "photos" / "again.png")
    assert answer["results"][0]["copies"] == [str(a)]
    # `similar` of a copy shows that copy first, its twin among the copies (the twin led, in file order)
    for asked, twin in ((a, tmp_path / "photos" / "again.png"), (tmp_path / "photos" / "again.png", a)):
        found = Index.open(tmp_path / "index", device="cpu").similar(asked)[0]
        assert (found.path, found.copies) == (str(asked), [str(twin)])


def test_min_prob_with_an_image_query_needs_an_added_text(library, tmp_path, monkeypatch):
    """`--image P --add TEXT` is re-ranked by TEXT, so --min-prob applies; it was refused as for --image alone."""
    image = library / "photos" / "family" / "img002.png"

    def ranked(*args):
        out = blipsearch("query", "--image", str(image), "--add", QUERY, "--json", "--top", "9", "--candidates", "9",
                         *args, index=library / "index").stdout
        return json.loads(out)["results"]

    every = ranked()
    probs = sorted(r["itm_prob"] for r in every)  # printed rounded: a threshold between two of them
    threshold = (probs[3] + probs[4]) / 2
    kept = ranked("--min-prob", str(threshold))
    assert kept == [r for r in every if r["itm_prob"] >= threshold] and 0 < len(kept) < len(every)
    alone = blipsearch("query", "--image", str(image), "--min-prob", "0.5", index=library / "index", expect=1)
    one_line_error(alone, "--min-prob needs a text term of positive weight to re-rank with")
    # a term's flag is named, not the query's text; `~` is expanded in W:PATH; a file named "12:30.png" is a path
    one_line_error(blipsearch("query", QUERY, "--add", " ", index=library / "index", expect=1), "--add text is empty")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "12:30.png").write_bytes(image.read_bytes())
    monkeypatch.chdir(tmp_path)
    for spec in ("0.5:~/12:30.png", "12:30.png"):
        assert len(query_json(library, "--add-image", spec, "--top", "3")["results"]) == 3


@pytest.mark.parametrize("args, message", [
    (["query", QUERY], "no index at"),
    (["status"], "no index at"),
    (["query", QUERY, "--no-rerank", "--min-prob", "0.5"], "--min-prob needs the ITM re-rank"),
    (["query"], "give a query TEXT, --image PATH or --keyword WORDS"),
    (["index", "/no/such/folder"], "/no/such/folder: no such file or folder"),
    # an unknown ~user: Path.expanduser raised RuntimeError (a traceback)
    (["index", "~nosuchuser-b"], "~nosuchuser-b: no such file or folder"),
])
def test_errors_are_one_line(tmp_path, args, message):
    result = blipsearch(*args, index=tmp_path / "missing", expect=1)
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr


def test_a_folder_of_photos_named_as_the_index_is_said_to_be_one(tmp_path):
    """`status --index PHOTOS` said "create one with `blipsearch index FOLDER`", which then refused that folder."""
    make_folder(tmp_path / "photos", 2)
    for args in (["status"], ["query", QUERY]):
        result = blipsearch(*args, index=tmp_path / "photos", expect=1)
        one_line_error(result, f"no index at {tmp_path / 'photos'}: it holds other files (img000.png, img001.png)")


def test_an_index_under_an_unknown_user_is_one_line(monkeypatch):
    from click.testing import CliRunner

    from blipsearch.retrieval.cli import main

    for args in (["status"], ["status", "--index", "~nosuchuser-b/index"]):
        monkeypatch.setenv("BLIPSEARCH_INDEX", "~nosuchuser-b/index")
        result = CliRunner().invoke(main, args)
        assert (result.exit_code, result.stderr) == (1, "blipsearch: error: no index at ~nosuchuser-b/index; create "
                                                        "one with `blipsearch index FOLDER`\n"), result.output


@pytest.mark.parametrize("args", [["query", QUERY, "--index", ""], ["status", "--index", " "],
                                  ["index", "photos", "--index", ""], ["query", QUERY, "--model", ""],
                                  ["index", "photos", "--captioner", ""]])
def test_an_empty_index_model_or_captioner_is_a_usage_error(tmp_path, monkeypatch, args):
    """`--index "$UNSET"` in a script once fell back to the default index, and wrote to it."""
    from click.testing import CliRunner

    from blipsearch.retrieval.cli import main

    monkeypatch.setenv("BLIPSEARCH_INDEX", str(tmp_path / "default"))
    (tmp_path / "photos").mkdir()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "is empty: name one, or leave the option out" in result.stderr, result.output
    assert not (tmp_path / "default").exists()


def test_an_empty_folder_argument_is_refused_not_read_as_the_current_folder(library, tmp_path, monkeypatch):
    """`index "$UNSET"` indexed the current folder (from a home folder: all of it); `--in ""` searched all."""
    monkeypatch.chdir(library / "photos" / "trips")
    result = blipsearch("index", "", index=tmp_path / "new", expect=1)
    one_line_error(result, "a folder argument is empty; name the folder (`.` for the current one)")
    assert not (tmp_path / "new").exists()
    one_line_error(blipsearch("query", QUERY, "--in", "", index=library / "index", expect=1),
                   "--in must name a folder")
    result = blipsearch("index", ".", "--workers", "100000", index=tmp_path / "new", expect=2)  # was a traceback
    assert "100000 is not in the range 0<=x<=64" in result.stderr


def test_a_file_given_as_index_or_model_is_named_as_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    for command in (["status"], ["query", QUERY]):
        result = blipsearch(*command, index=tmp_path / "afile", expect=1)
        assert "no index at " + str(tmp_path / "afile") + ": it is a file; name an index folder" in result.stderr
    result = blipsearch("index", str(tmp_path), "--model", str(tmp_path / "afile"), index=tmp_path / "new", expect=1)
    assert f"model {tmp_path / 'afile'} is a file; pass the folder that holds its config.json" in result.stderr


def test_empty_index_says_so(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    blipsearch("index", str(tmp_path / "empty"), "--model", str(tiny_model_dir), index=tmp_path / "index")
    result = blipsearch("query", QUERY, index=tmp_path / "index", expect=1)
    assert "is empty; add images with `blipsearch index FOLDER`" in result.stderr


def test_model_mismatch_says_how_to_rebuild(library, tmp_path):
    other = save_tiny_blip(tmp_path / "other", seed=5)
    result = blipsearch("query", QUERY, "--model", str(other), index=library / "index", expect=1)
    assert f"rebuild it with `blipsearch index --rebuild --model {other} FOLDER...`" in result.stderr
    assert "leave out --model to use the index's model" in result.stderr  # it said "query without", to index too


def test_a_changed_model_folder_and_a_hand_edited_manifest_are_named_as_such(tmp_path, tiny_model_dir):
    """Both once said "query without --model", to a query given none."""
    import shutil

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    make_folder(tmp_path / "photos", 1)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(model), "-q", index=tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    with open(model / "config.json", "a") as config:
        config.write(" ")
    result = blipsearch("query", QUERY, index=tmp_path / "index", expect=1)
    assert f"the model {model} has changed since it built the index at {tmp_path / 'index'} (revision " in \
        result.stderr and "leave out --model" not in result.stderr
    (tmp_path / "index" / "manifest.json").write_text(json.dumps(manifest | {"embedding": {
        **manifest["embedding"], "dim": 64}}))
    (model / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    result = blipsearch("query", QUERY, index=tmp_path / "index", expect=1)
    assert f"records other embed_dim than its model {model} gives; rebuild it with" in result.stderr


def test_skipped_files_exit_3_and_are_named(tmp_path, tiny_model_dir):
    make_folder(tmp_path / "photos", 2)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result = blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q",
                        index=tmp_path / "index", expect=3)
    assert f"skipped {tmp_path / 'photos' / 'broken.jpg'}: " in result.stderr
    assert "indexed 2, reused 0 (moved or copied), unchanged 0, removed 0, skipped 1" in result.stderr


def test_control_characters_in_file_names_are_escaped_on_the_terminal(tmp_path, tiny_model_dir):
    """A newline in a name once split a "skipped" line in two (and could fake a summary line); an escape
    sequence reached the terminal raw. The paths' own bytes still reach --json, --paths and -0."""
    from photos import make_photo

    photos = tmp_path / "photos"
    make_folder(photos, 1)
    (photos / "evil\nblipsearch: indexed 999.jpg").write_bytes(b"not an image")
    (photos / "esc\x1b]0;pwned\x07.jpg").write_bytes(b"not an image")
    make_photo(photos / "red\x1b[31m.png", seed=5)
    result = blipsearch("index", str(photos), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index",
                        expect=3)
    lines = result.stderr.splitlines()
    assert f"blipsearch: skipped {photos}/evil\\nblipsearch: indexed 999.jpg: not an image" in " ".join(lines)
    assert any(line.startswith(f"blipsearch: skipped {photos}/esc\\x1b]0;pwned\\x07.jpg: ") for line in lines)
    assert len(lines) == 3 and "\x1b" not in result.stderr and "\x07" not in result.stderr
    table = blipsearch("query", "a photo", index=tmp_path / "index").stdout
    assert "red\\x1b[31m.png" in table and "\x1b" not in table
    found = json.loads(blipsearch("query", "a photo", "--json", index=tmp_path / "index").stdout)
    assert str(photos / "red\x1b[31m.png") in [r["path"] for r in found["results"]]
    failed = blipsearch("status", index=tmp_path / "no\nsuch", expect=1)
    assert failed.stderr.count("\n") == 1 and "no\\nsuch" in failed.stderr


def reference_ranking(model_dir, paths, text):
    """BLIP's protocol with transformers' own forward passes (fp32): ITM([ENC]) class-1 logit + ITC."""
    model = BlipForImageTextRetrieval.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = BlipImageProcessorPil.from_pretrained(model_dir)
    tokens = tokenizer([text], return_tensors="pt")
    enc_ids = tokens.input_ids.clone()
    enc_ids[:, 0] = tokenizer.convert_tokens_to_ids("[ENC]")
    scores = {}
    with torch.no_grad():
        for path in paths:
            pixels = processor(Image.open(path), return_tensors="pt")["pixel_values"]
            itm = model(input_ids=enc_ids, attention_mask=tokens.attention_mask, pixel_values=pixels).itm_score
            itc = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels,
                        use_itm_head=False).itm_score
            scores[str(path)] = float(itm[0, 1] + itc[0, 0])
    return scores


def test_end_to_end_ranking_equals_the_papers_protocol(tmp_path, tiny_model_dir):
    """A fresh process indexes a folder and answers; the order is BLIP's two-stage ranking of those files."""
    paths = make_folder(tmp_path / "photos", 10, seed=7)
    env_index = ["--index", str(tmp_path / "index"), "--device", "cpu", "--precision", "fp32"]
    cli = [sys.executable, "-m", "blipsearch.retrieval.cli"]
    subprocess.run([*cli, "index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", *env_index],
                   check=True, capture_output=True, timeout=300)
    out = subprocess.run([*cli, "query", QUERY, "--json", "--top", "10", "--candidates", "10", *env_index],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    results = json.loads(out)["results"]
    expected = reference_ranking(tiny_model_dir, paths, QUERY)
    assert sorted(expected, key=expected.get, reverse=True) == [r["path"] for r in results]
    for row in results:
        assert row["score"] == pytest.approx(expected[row["path"]], abs=0.02)


@pytest.mark.parametrize("demo", ["demo_model", "blip2_demo_model"])
def test_demo_model_answers_the_readme_query_with_the_scene_it_describes(tmp_path, demo):
    """The README's main job, end to end: each committed demo model (BLIP, BLIP-2) ranks the described scene
    first, and below it the same scene with the colours swapped (its binding twin) and with the places
    swapped (its mirror, which only the relation's direction tells apart)."""
    from benchmark_scripts import scenes

    sc = scenes()
    sc.write_demo_folder(tmp_path / "demo")
    own, twin, mirror = (np.asarray(sc.render(scene, 192)).tobytes() for scene in sc.SHOWCASE)
    rendered = {own: "own", twin: "twin", mirror: "mirror"}
    role = {str(p): rendered.get(np.asarray(Image.open(p)).tobytes()) for p in (tmp_path / "demo").glob("*.png")}
    demo_model = Path(__file__).parents[1] / "training" / demo
    blipsearch("index", str(tmp_path / "demo"), "--model", str(demo_model), "-q", index=tmp_path / "index")
    answer = query_json_at(tmp_path / "index", "a large red circle left of a large blue square", "--top", "60")
    ranked = [role[r["path"]] for r in answer["results"]]
    assert ranked[0] == "own" and ranked.index("twin") > 0 and ranked.index("mirror") > 0
    assert answer["results"][0]["itm_prob"] > 0.5
    # the ITM head calls the twin and the mirror non-matches: binding and the relation's direction are read
    assert all(r["itm_prob"] < 0.5 for r in answer["results"] if role[r["path"]] in ("twin", "mirror"))


def query_json_at(index, text, *args):
    return json.loads(blipsearch("query", text, "--json", *args, index=index).stdout)


def test_rebuild_keeps_the_index_model(tmp_path, tiny_model_dir):
    make_folder(tmp_path / "photos", 2)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    blipsearch("index", str(tmp_path / "photos"), "--rebuild", "-q", index=tmp_path / "index")
    status = json.loads(blipsearch("status", "--json", index=tmp_path / "index").stdout)
    assert status["model"] == str(tiny_model_dir) and status["files"] == 2


def test_an_index_location_that_cannot_be_made_is_one_line(tmp_path, tiny_model_dir):
    (tmp_path / "a-file").write_text("not a folder")
    make_folder(tmp_path / "photos", 1)
    result = blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir),
                        index=tmp_path / "a-file" / "index", expect=1)
    assert "cannot create the index folder" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_quiet_run_on_a_new_index_prints_its_summary_alone(tmp_path, tiny_model_dir):
    """LanceDB's own log printed two WARN lines ("No existing dataset ... it will be created") on every new
    index, past `-q`."""
    from photos import make_folder
    from runner import run_cli

    make_folder(tmp_path / "photos", 2)
    done = run_cli("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "--index",
                   str(tmp_path / "index"), "--device", "cpu", "-q", text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blipsearch: indexed 2, "), done.stderr
