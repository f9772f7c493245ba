"""What a failing disk or a hostile user does to an index: every fault is one line, never a traceback, and
never silent corruption or lost data. (Reads that block or are huge: test_faults_reads.py; damaged
checkpoints: test_faults_model.py.)"""

import errno
import json
import os
import shutil
import signal
import subprocess

import pytest

from blipsearch.indexer import location as location_module
from blipsearch.indexer import store as store_module
from blipsearch.indexer.features import FeatureSegments
from blipsearch.indexer.reader import IndexReader

from photos import make_folder
from runner import CLI, blipsearch, one_line_error

TEXT = "a red dog on the beach"


@pytest.fixture
def library(tmp_path, tiny_model_dir):
    """Folders a (6 pictures) and b (2) indexed with the tiny model; returns the tmp folder."""
    make_folder(tmp_path / "a", 6, seed=1)
    make_folder(tmp_path / "b", 2, seed=2)
    index(tmp_path, tiny_model_dir, "a", "b")
    return tmp_path


def index(root, model_dir, *folders, expect=0, extra=()):
    args = [str(root / f) for f in folders]
    return blipsearch("index", *args, "--model", str(model_dir), "-q", *extra, index=root / "index", expect=expect)


def query(root, *args, expect=0):
    return blipsearch("query", TEXT, *args, index=root / "index", expect=expect)


def status(root, expect=0):
    return blipsearch("status", index=root / "index", expect=expect)


def hint(model_dir) -> str:
    return f"rebuild it with `blipsearch index --rebuild --model {model_dir} FOLDER...`"


def tree_bytes(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- feature segments ------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["cut short", "deleted"])
def test_a_short_or_missing_feature_segment_is_reported_in_index_query_and_status(library, tiny_model_dir, damage):
    segment = library / "index" / "features" / "000001.bin"
    if damage == "deleted":
        segment.unlink()
    else:
        os.truncate(segment, 3 * IndexReader.open(library / "index").manifest.identity.record_bytes)
    before = tree_bytes(library / "index" / "features")
    for result in (index(library, tiny_model_dir, "a", "b", expect=1), query(library, expect=1)):
        one_line_error(result, str(library / "index"), "000001.bin", hint(tiny_model_dir))
    result = status(library, expect=1)
    assert "damaged  yes" in result.stdout
    one_line_error(result, "000001.bin", hint(tiny_model_dir))
    assert tree_bytes(library / "index" / "features") == before  # the refused run wrote nothing
    index(library, tiny_model_dir, "a", "b", extra=["--rebuild"])
    assert len(json.loads(query(library, "--json", "--top", "8").stdout)["results"]) == 8


CUT_WHILE_OPEN = """
import os, sys
from blipsearch.retrieval.api import Index
from blipsearch.retrieval.errors import IndexDamagedError
index = Index.open(sys.argv[1], device="cpu")
index.search("a red dog", None)  # the segment is mapped now
segment = os.path.join(sys.argv[1], "features", "000001.bin")
os.truncate(segment, os.path.getsize(segment) // 3)
try:
    index.search("a red dog", None)
except IndexDamagedError as exc:
    print(exc)
"""


def test_a_segment_cut_short_while_a_process_has_it_open_is_damage_not_a_crash(library):
    """Reading a mapped file past its end is SIGBUS: a server whose segment was cut short in place died."""
    done = subprocess.run([*CLI[:1], "-c", CUT_WHILE_OPEN, str(library / "index")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "000001.bin holds" in done.stdout and "it was cut short; rebuild it with" in done.stdout


def test_new_records_go_past_every_slot_the_rows_name_and_past_records_a_killed_run_left(tmp_path):
    segments = FeatureSegments(tmp_path, record_bytes=4)
    segments.append(1, [b"aaaa", b"bbbb", b"cccc"])  # rows will name slots 0 and 1; slot 2 is unreferenced
    assert segments.check({1: 2}) is None and "cut short" in segments.check({1: 4})
    assert "missing" in segments.check({2: 1})
    segments.start({1: 2})
    assert segments.append(1, [b"dddd"]) == [3]  # not over slot 2, which an older snapshot may still name
    fresh = FeatureSegments(tmp_path, record_bytes=4)
    fresh.start({1: 6})  # rows name more slots than the file holds: `check` refuses this before any write
    assert fresh.append(1, [b"eeee"]) == [6]
    assert bytes(fresh.read(1, 0)) == b"aaaa" and bytes(fresh.read(1, 3)) == b"dddd"


# ---- interrupted rebuilds, damaged and missing tables ---------------------------------------------

def test_an_interrupted_rebuild_leaves_an_index_that_asks_to_be_rebuilt(library, tiny_model_dir, monkeypatch):
    real_rmtree = shutil.rmtree

    def rmtree_then_ctrl_c(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        if os.path.basename(path) == "images.lance":
            raise KeyboardInterrupt

    monkeypatch.setattr(location_module.shutil, "rmtree", rmtree_then_ctrl_c)
    index(library, tiny_model_dir, "a", expect=130, extra=["--rebuild"])
    monkeypatch.undo()
    for result in (status(library, expect=1), query(library, expect=1), index(library, tiny_model_dir, "a", expect=1)):
        one_line_error(result, "damaged (a --rebuild is under way, or was interrupted)", hint(tiny_model_dir))
    blipsearch("index", str(library / "a"), "--rebuild", "-q", index=library / "index")  # the index's own model
    report = json.loads(blipsearch("status", "--json", index=library / "index").stdout)
    assert (report["model"], report["files"], report["damaged"]) == (str(tiny_model_dir), 6, None)


def test_a_missing_table_is_one_line_and_queries_keep_working_from_the_snapshot(library, tiny_model_dir):
    shutil.rmtree(library / "index" / "files.lance")
    answer = query(library, "--json").stdout
    one_line_error(index(library, tiny_model_dir, "a", "b", expect=1), "missing or damaged table",
                   hint(tiny_model_dir))
    assert query(library, "--json").stdout == answer  # the failed run did not flag the index as being written
    one_line_error(status(library, expect=1), "missing or damaged table")


# ---- full disks, read-only folders -----------------------------------------------------------------

LANCE_ENOSPC = "lance error: LanceError(IO): No space left on device (os error 28), writer/structural.rs:258:9"


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError(LANCE_ENOSPC)])
def test_a_full_disk_mid_run_is_one_line_and_keeps_the_committed_batches(tmp_path, tiny_model_dir, monkeypatch,
                                                                         failure):
    make_folder(tmp_path / "a", 6)
    real_append, calls = FeatureSegments.append, []

    def append_until_full(self, segment, records):
        calls.append(len(records))
        if len(calls) == 2:
            raise failure
        return real_append(self, segment, records)

    monkeypatch.setattr(FeatureSegments, "append", append_until_full)
    result = index(tmp_path, tiny_model_dir, "a", expect=1, extra=["--batch-size", "2", "--workers", "0"])
    one_line_error(result, f"cannot write the index at {tmp_path / 'index'}: the disk is full; free some space")
    monkeypatch.undo()
    assert len(IndexReader.open(tmp_path / "index").files()) == 2  # the first batch, read from the tables
    assert len(json.loads(query(tmp_path, "--json").stdout)["results"]) == 2
    index(tmp_path, tiny_model_dir, "a")
    assert len(IndexReader.open(tmp_path / "index").files()) == 6


@pytest.mark.parametrize("table", ["files", "images"])
def test_a_full_disk_while_a_new_index_makes_its_tables_is_finished_by_running_again(tmp_path, tiny_model_dir,
                                                                                   monkeypatch, table):
    """Running again said the index was damaged (a table not found) and asked for --rebuild."""
    import lancedb.db

    make_folder(tmp_path / "a", 2)
    real_create = lancedb.db.LanceDBConnection.create_table

    def create_until_full(self, name, *args, **kwargs):
        if name == table:
            (tmp_path / "index" / f"{name}.lance").mkdir()  # as far as a write got
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(lancedb.db.LanceDBConnection, "create_table", create_until_full)
    one_line_error(index(tmp_path, tiny_model_dir, "a", expect=1), "the disk is full; free some space")
    monkeypatch.undo()
    assert "0 files" in status(tmp_path).stdout  # empty, not damaged: the next run makes the rest
    index(tmp_path, tiny_model_dir, "a")
    assert len(json.loads(query(tmp_path, "--json").stdout)["results"]) == 2


def test_a_read_only_index_refuses_to_index_in_one_line_and_still_answers(library, tiny_model_dir, monkeypatch):
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    answer = query(library, "--json").stdout
    monkeypatch.setattr(location_module.os, "open", read_only_open)
    result = index(library, tiny_model_dir, "a", expect=1)
    monkeypatch.undo()
    one_line_error(result, "the file system is read-only; queries still work")
    assert query(library, "--json").stdout == answer


# ---- the manifest, the folder ----------------------------------------------------------------------

def test_a_lost_manifest_is_refused_naming_the_model_and_no_file_is_dropped(library, tiny_model_dir):
    (library / "index" / "manifest.json").unlink()
    before = tree_bytes(library / "index")
    for result in (index(library, tiny_model_dir, "a", expect=1), query(library, expect=1),
                   status(library, expect=1)):
        one_line_error(result, "has lost its manifest.json", hint(tiny_model_dir))
    assert tree_bytes(library / "index") == before


@pytest.mark.parametrize("text", ["{}", "[]", '{"schema_version": 1, "mod', "\udcff"])
def test_a_damaged_manifest_is_one_line_and_rebuild_uses_the_index_model(library, tiny_model_dir, text):
    (library / "index" / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    for result in (status(library, expect=1), query(library, expect=1), index(library, tiny_model_dir, "a", expect=1)):
        one_line_error(result, "manifest of the index", "is damaged", hint(tiny_model_dir))
    blipsearch("index", str(library / "a"), "--rebuild", "-q", index=library / "index")
    assert json.loads(blipsearch("status", "--json", index=library / "index").stdout)["model"] == str(tiny_model_dir)


def test_rebuilding_an_index_that_names_no_model_asks_for_one(library):
    shutil.rmtree(library / "index" / "snapshot")
    (library / "index" / "manifest.json").write_text("{}")
    result = blipsearch("index", str(library / "a"), "--rebuild", index=library / "index", expect=1)
    one_line_error(result, "no longer says which model built it", "--rebuild --model MODEL")


def test_stray_desktop_files_in_the_index_folder_are_ignored(library, tiny_model_dir):
    for name in (".DS_Store", "Thumbs.db", ".nfs000000000123", "._manifest.json"):
        (library / "index" / name).write_text("junk")
    index(library, tiny_model_dir, "a", "b")
    assert json.loads(blipsearch("status", "--json", index=library / "index").stdout)["files"] == 8


def test_a_refused_folder_gets_no_lock(tmp_path, tiny_model_dir):
    make_folder(tmp_path / "a", 1)
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "notes.txt").write_text("mine")
    one_line_error(index(tmp_path, tiny_model_dir, "a", expect=1),
                   "holds files that are not a blipsearch index (notes.txt)")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("damage", ["deleted", "recall.faiss", "files.npz", "captions.bin"])
def test_a_deleted_or_damaged_snapshot_is_reported_and_rewritten_by_the_next_run(library, tiny_model_dir, damage):
    """A damaged file in it once went unnoticed: every query read the slower tables until some file changed."""
    folder = library / "index" / "snapshot"
    if damage == "deleted":
        shutil.rmtree(folder)
    else:
        data = (folder / damage).read_bytes()
        (folder / damage).write_bytes(data[:len(data) // 2])  # cut short in place
    assert not IndexReader.open(library / "index").from_snapshot
    assert len(json.loads(query(library, "--json", "--top", "8").stdout)["results"]) == 8  # from the tables
    report = status(library)
    assert "note     the snapshot queries read is missing or damaged" in report.stdout
    assert json.loads(blipsearch("status", "--json", index=library / "index").stdout)["snapshot"] is False
    index(library, tiny_model_dir, "a", "b")  # nothing changed in the folders
    assert IndexReader.open(library / "index").from_snapshot
    assert json.loads(blipsearch("status", "--json", index=library / "index").stdout)["snapshot"] is True


def test_an_index_path_that_is_not_utf8_is_one_line(tmp_path, tiny_model_dir):
    make_folder(tmp_path / "a", 1)
    result = blipsearch("index", str(tmp_path / "a"), "--model", str(tiny_model_dir), index=tmp_path / "idx\udcff",
                        expect=1)
    one_line_error(result, "idx\\xff is not valid UTF-8")
    assert not os.path.exists(os.fsencode(tmp_path) + b"/idx\xff")


# ---- outputs ---------------------------------------------------------------------------------------

def test_json_is_valid_utf8_for_any_name(library):
    odd = os.fsencode(library) + b"/caf\xe9.png"
    shutil.copy(library / "a" / "img000.png", odd)
    result = blipsearch("query", "--image", os.fsdecode(odd), "--json", index=library / "index")
    answer = json.loads(result.stdout_bytes.decode("utf-8"))  # strict UTF-8
    assert answer["query"] == str(library / "caf\\xe9.png")
    assert answer["results"][0]["path"] == str(library / "a" / "img000.png")


def test_paths_with_null_ends_carry_names_with_newlines(tmp_path, tiny_model_dir):
    make_folder(tmp_path / "a", 3)
    (tmp_path / "a" / "img001.png").rename(tmp_path / "a" / "two\nlines.png")
    index(tmp_path, tiny_model_dir, "a")
    expected = [r["path"] for r in json.loads(query(tmp_path, "--json").stdout)["results"]]
    assert str(tmp_path / "a" / "two\nlines.png") in expected
    assert query(tmp_path, "--paths", "-0").stdout_bytes.split(b"\0") == [os.fsencode(p) for p in expected] + [b""]
    assert query(tmp_path, "--null").stdout_bytes == query(tmp_path, "--paths", "--null").stdout_bytes


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("args", [(TEXT,), (TEXT, "--paths"), (TEXT, "--json")])
def test_output_that_cannot_be_written_is_one_line(library, args):
    """`> /dev/full`, a full disk under the output file: a traceback from click's echo before."""
    with open("/dev/full", "w") as full:
        process = subprocess.run([*CLI, "query", *args, "--index", str(library / "index"), "--device", "cpu"],
                                 stdout=full, stderr=subprocess.PIPE, timeout=300)
    assert process.returncode == 1 and process.stderr.decode().splitlines() == [
        "blipsearch: error: No space left on device; free some space, or send the output elsewhere"]


def test_a_closed_pipe_ends_the_command_quietly(library):
    process = subprocess.Popen([*CLI, "query", TEXT, "--paths", "--index", str(library / "index"), "--device",
                                "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before anything is written (as `| head -0` does)
    _, stderr = process.communicate(timeout=300)
    assert stderr == b"" and process.returncode in (141, -signal.SIGPIPE)



def test_in_a_linked_subfolder_finds_its_files(tmp_path, tiny_model_dir):
    make_folder(tmp_path / "photos" / "trips", 2, seed=1)
    make_folder(tmp_path / "elsewhere", 2, seed=2)
    (tmp_path / "photos" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    index(tmp_path, tiny_model_dir, "photos")
    paths = [r["path"] for r in json.loads(query(tmp_path, "--json", "--in", str(tmp_path / "photos" / "linked"))
                                           .stdout)["results"]]
    assert sorted(paths) == [str(tmp_path / "photos" / "linked" / f"img00{i}.png") for i in (0, 1)]


def test_segments_retired_by_a_run_killed_in_its_last_step_are_still_freed(tmp_path, tiny_model_dir, monkeypatch):
    paths = make_folder(tmp_path / "a", 6)
    index(tmp_path, tiny_model_dir, "a")
    for path in paths[1:]:
        path.unlink()
    make_folder(tmp_path / "a" / "new", 1, seed=9)

    def killed(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module.IndexWriter, "compact", killed)  # after the retiring, before the snapshot
    index(tmp_path, tiny_model_dir, "a", expect=130)
    monkeypatch.undo()
    assert json.loads((tmp_path / "index" / "manifest.json").read_text())["retired_segments"] == [1]
    index(tmp_path, tiny_model_dir, "a")
    assert not (tmp_path / "index" / "features" / "000001.bin").exists()
    assert len(json.loads(query(tmp_path, "--json").stdout)["results"]) == 2
