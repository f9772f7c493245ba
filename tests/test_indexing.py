"""Incremental, resumable indexing through the library API (the CLI is tested in test_cli.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from blipsearch.indexer.pipeline import IndexOptions, index_folders
from blipsearch.indexer.reader import IndexReader
from blipsearch.indexer.store import IndexWriter
from blipsearch.retrieval.errors import IndexDamagedError, IndexLockedError, InvalidInputError, ModelMismatchError
from blipsearch.retrieval.models import load_model

from photos import make_folder, make_photo
from test_images import BAD_FILES
from tiny import save_tiny_blip


class CountingModel:
    """The tiny model, counting the images it encodes."""

    def __init__(self, model):
        self.model, self.info, self.device, self.encoded = model, model.info, model.device, 0

    def pixel_values(self, images):
        return self.model.pixel_values(images)

    def encode_images(self, pixels):
        self.encoded += len(pixels)
        return self.model.encode_images(pixels)


@pytest.fixture
def model(family_model):
    """Every test here runs once per model family (BLIP: 1 vector per image; BLIP-2: 8 query vectors)."""
    return CountingModel(family_model)


def run(folders, model, index_dir):
    model.encoded = 0
    store = IndexWriter.open(index_dir, model.info)
    try:
        return index_folders(folders, model, store, IndexOptions(batch_size=4, progress=False))
    finally:
        store.close()


def stored(index_dir):
    reader = IndexReader.open(index_dir)
    return {os.path.relpath(p, index_dir.parent / "photos"): h for p, h in reader.files().items()}, \
        reader.counts()[1]


def test_incremental_add_unchanged_change_touch_delete_move_copy(tmp_path, model):
    photos, index = tmp_path / "photos", tmp_path / "index"
    make_folder(photos, 6)
    s = run([photos], model, index)
    assert (s.indexed, s.unchanged, s.removed, model.encoded) == (6, 0, 0, 6)

    s = run([photos], model, index)
    assert (s.indexed, s.unchanged, model.encoded) == (0, 6, 0)

    before, _ = stored(index)
    make_photo(photos / "img001.png", seed=99)  # new content, same name
    os.utime(photos / "img002.png", ns=(1, 1_000_000_000))  # touched: same bytes, other mtime
    (photos / "img003.png").unlink()
    (photos / "sub").mkdir()
    (photos / "img004.png").rename(photos / "sub" / "moved.png")
    shutil.copy(photos / "img005.png", photos / "sub" / "copy.png")
    s = run([photos], model, index)
    # removed: img003 alone; the moved file's old path is no removal (it is reused at its new one)
    assert (s.indexed, s.reused, s.unchanged, s.removed, model.encoded) == (1, 2, 3, 1, 1)

    after, images = stored(index)
    assert sorted(after) == ["img000.png", "img001.png", "img002.png", "img005.png", "sub/copy.png", "sub/moved.png"]
    assert after["img001.png"] != before["img001.png"]
    assert after["sub/moved.png"] == before["img004.png"]
    assert after["sub/copy.png"] == after["img005.png"]
    assert images == 5  # the copy shares its content row; old img001 and img003 content were pruned


def test_identical_new_files_are_encoded_once(tmp_path, model):
    photos = tmp_path / "photos"
    a = make_photo(photos / "a.png", seed=1)
    shutil.copy(a, photos / "b.png")
    s = run([photos], model, tmp_path / "index")
    assert (s.indexed, model.encoded) == (2, 1)


def test_runs_on_other_folders_do_not_remove_files(tmp_path, model):
    make_folder(tmp_path / "photos" / "a", 2, seed=1)
    make_folder(tmp_path / "photos" / "b", 3, seed=2)
    run([tmp_path / "photos" / "a"], model, tmp_path / "index")
    s = run([tmp_path / "photos" / "b"], model, tmp_path / "index")
    assert s.removed == 0 and len(stored(tmp_path / "index")[0]) == 5
    with pytest.raises(InvalidInputError, match="no such file or folder"):
        run([tmp_path / "photos" / "gone"], model, tmp_path / "index")
    assert len(stored(tmp_path / "index")[0]) == 5


def test_bad_files_are_skipped_with_reasons_and_the_run_goes_on(tmp_path, model):
    photos = tmp_path / "photos"
    make_folder(photos, 3)
    expected = {str(make(photos)): reason for make, reason in BAD_FILES}
    s = run([photos], model, tmp_path / "index")
    assert s.indexed == 3
    assert {path: reason for path, reason in s.skipped} == expected


def test_a_file_that_turns_bad_loses_its_stale_row(tmp_path, model):
    photos = tmp_path / "photos"
    make_folder(photos, 2)
    run([photos], model, tmp_path / "index")
    (photos / "img000.png").write_bytes(b"broken now")
    s = run([photos], model, tmp_path / "index")
    assert [p for p, _ in s.skipped] == [str(photos / "img000.png")]
    assert sorted(stored(tmp_path / "index")[0]) == ["img001.png"]


def test_another_model_is_refused_and_one_writer_at_a_time(tmp_path, model):
    make_folder(tmp_path / "photos", 1)
    run([tmp_path / "photos"], model, tmp_path / "index")
    other = load_model(str(save_tiny_blip(tmp_path / "other", seed=1)), "cpu", "fp32")
    with pytest.raises(ModelMismatchError, match="rebuild it with `blipsearch index --rebuild"):
        IndexWriter.open(tmp_path / "index", other.info)
    writer = IndexWriter.open(tmp_path / "index", model.info)
    with pytest.raises(IndexLockedError, match="another blipsearch process is writing"):
        IndexWriter.open(tmp_path / "index", model.info)
    writer.close()
    IndexWriter.open(tmp_path / "index", other.info, rebuild=True).close()
    assert IndexReader.open(tmp_path / "index").counts() == (0, 0)


def test_an_index_of_one_family_refuses_a_model_of_the_other(tmp_path, tiny_model, tiny_blip2_dir):
    make_folder(tmp_path / "photos", 1)
    run([tmp_path / "photos"], CountingModel(tiny_model), tmp_path / "index")
    blip2 = load_model(str(tiny_blip2_dir), "cpu", "fp32")
    message = (f"holds vectors of the blip model {tiny_model.info.model_id} .* not of the blip-2 model "
               f"{blip2.info.model_id} .* rebuild it with `blipsearch index --rebuild --model {blip2.info.model_id}")
    with pytest.raises(ModelMismatchError, match=message):
        IndexWriter.open(tmp_path / "index", blip2.info)
    assert IndexReader.open(tmp_path / "index").manifest.identity.family == "blip"


def test_an_unrelated_folder_is_never_used_as_an_index(tmp_path, model):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    for rebuild in (False, True):
        with pytest.raises(InvalidInputError, match="holds files that are not a blipsearch index"):
            IndexWriter.open(tmp_path / "docs", model.info, rebuild=rebuild)
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "precious"


def test_rebuild_repairs_a_damaged_manifest(tmp_path, model):
    photos, index = tmp_path / "photos", tmp_path / "index"
    make_folder(photos, 2)
    run([photos], model, index)
    (index / "manifest.json").write_text("{half a manifest")
    hint = f"rebuild it with `blipsearch index --rebuild --model {model.info.model_id} FOLDER...`"
    with pytest.raises(IndexDamagedError, match=re.escape(hint)):
        IndexReader.open(index)
    IndexWriter.open(index, model.info, rebuild=True).close()
    assert run([photos], model, index).indexed == 2
    assert IndexReader.open(index).counts() == (2, 2)


def test_an_idle_run_changes_nothing(tmp_path, model):
    photos, index = tmp_path / "photos", tmp_path / "index"
    make_folder(photos, 2)
    run([photos], model, index)
    generation = json.loads((index / "manifest.json").read_text())["generation"]
    run([photos], model, index)
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["generation"] == generation and manifest["writing"] is False
    assert IndexReader.open(index).from_snapshot


def test_a_file_dated_past_2262_is_indexed_and_the_next_run_leaves_it(tmp_path, model):
    """Its modification time overflowed the index's int64 nanoseconds: every run that met it ended in a
    traceback, its batch unstored."""
    photos, index = tmp_path / "photos", tmp_path / "index"
    make_folder(photos, 2)
    far = 10_000_000_000 * 1_000_000_000  # year 2286
    os.utime(photos / "img001.png", ns=(far, far))
    assert run([photos], model, index).indexed == 2
    assert IndexReader.open(index).counts() == (2, 2)
    again = run([photos], model, index)
    assert (again.indexed, again.unchanged, model.encoded) == (0, 2, 0)


def test_an_emptied_folder_keeps_its_files_unless_allowed(tmp_path, model):
    photos, index = tmp_path / "photos", tmp_path / "index"
    make_folder(photos, 3)
    run([photos], model, index)
    for path in photos.iterdir():
        path.unlink()  # an unmounted drive looks like this
    assert run([photos], model, index).removed == 0
    assert IndexReader.open(index).counts() == (3, 3)
    store = IndexWriter.open(index, model.info)
    try:
        summary = index_folders([photos], model, store, IndexOptions(progress=False, allow_empty=True))
    finally:
        store.close()
    assert summary.removed == 3 and IndexReader.open(index).counts() == (0, 0)


def test_a_deleted_folder_is_refused_and_its_files_removed_with_allow_empty(tmp_path, model):
    """Nothing removed a deleted folder's files: it was refused even with --allow-empty (as an emptied
    s3:// prefix was until it was allowed), and its pictures kept coming back in queries."""
    make_folder(tmp_path / "a", 3, seed=1)
    make_folder(tmp_path / "b", 2, seed=2)
    index = tmp_path / "index"
    run([tmp_path / "a", tmp_path / "b"], model, index)
    shutil.rmtree(tmp_path / "a")
    with pytest.raises(InvalidInputError, match=r"a: no such file or folder \(if it was deleted, --allow-empty "
                                                r"removes what the index holds from it\)"):
        run([tmp_path / "a"], model, index)
    assert IndexReader.open(index).counts() == (5, 5)
    store = IndexWriter.open(index, model.info)
    try:
        summary = index_folders([tmp_path / "a"], model, store, IndexOptions(progress=False, allow_empty=True))
    finally:
        store.close()
    assert (summary.removed, summary.skipped) == (3, [])
    assert sorted(IndexReader.open(index).files()) == sorted(str(p) for p in (tmp_path / "b").iterdir())
    # through a link above it, as the index names its files (resolved, not as typed)
    (tmp_path / "via").symlink_to(tmp_path / "b")
    shutil.rmtree(tmp_path / "b")
    store = IndexWriter.open(index, model.info)
    try:
        summary = index_folders([tmp_path / "via"], model, store, IndexOptions(progress=False, allow_empty=True))
    finally:
        store.close()
    assert summary.removed == 2 and IndexReader.open(index).counts() == (0, 0)


def test_file_names_that_are_not_utf8_are_skipped_with_a_reason(tmp_path, model):
    photos = tmp_path / "photos"
    make_folder(photos, 1)
    odd = os.path.join(os.fsencode(photos), b"caf\xe9.png")
    with open(odd, "wb") as f:
        f.write((photos / "img000.png").read_bytes())
    summary = run([photos], model, tmp_path / "index")
    assert summary.indexed == 1
    assert [reason for _, reason in summary.skipped] == ["file name is not valid UTF-8; rename the file"]


def test_killed_run_resumes_with_exactly_one_row_per_file(tmp_path, family_model_dir):
    """SIGKILL mid-run loses at most the batch in flight; the next run finishes the job."""
    photos, index = tmp_path / "photos", tmp_path / "index"
    make_folder(photos, 120)
    command = [sys.executable, "-m", "blipsearch.retrieval.cli", "index", str(photos), "--model",
               str(family_model_dir), "--index", str(index), "--batch-size", "4", "--device", "cpu", "-q"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    committed = wait_for_rows(index, process, at_least=8)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(IndexReader.open(index).files())
    assert done_before >= committed and done_before % 4 == 0  # whole batches only
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    indexed, reused = map(int, re.search(r"indexed (\d+), reused (\d+)", result.stderr).groups())
    # the batch in flight may have stored its features but not its files: they are reused, not re-encoded
    assert indexed + reused == 120 - done_before and reused <= 4
    records = IndexReader.open(index).files()
    assert sorted(records) == sorted(str(p) for p in photos.iterdir())
    assert IndexReader.open(index).counts() == (120, 120)


def wait_for_rows(index, process, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            rows = IndexReader.open(index).counts()[0]
        except Exception:  # not created yet, or a commit under way
            rows = 0
        if rows >= at_least:
            return rows
        time.sleep(0.05)
    raise AssertionError("indexing made no progress")


def features_by_path(index_dir):
    reader = IndexReader.open(index_dir)
    files = reader.files()
    return {p: reader.token_features([h])[0] for p, h in files.items()}


def test_mostly_dead_feature_segments_are_copied_forward_then_deleted(tmp_path, model):
    photos, index = tmp_path / "photos", tmp_path / "index"
    paths = make_folder(photos, 6)
    run([photos], model, index)
    for path in paths[1:]:
        path.unlink()
    make_photo(photos / "new.png", seed=50)
    before = features_by_path(index)[str(paths[0])]
    run([photos], model, index)  # segment 1 keeps 1 live record of 6: it is retired
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["retired_segments"] == [1] and manifest["current_segment"] == 2
    assert (index / "features" / "000001.bin").exists()  # a query that started earlier may still read it
    after = features_by_path(index)
    np.testing.assert_array_equal(after[str(paths[0])], before)
    run([photos], model, index)
    assert not (index / "features" / "000001.bin").exists()
    np.testing.assert_array_equal(features_by_path(index)[str(paths[0])], before)


def test_a_torn_record_from_a_killed_run_is_overwritten(tmp_path, model):
    photos, index = tmp_path / "photos", tmp_path / "index"
    make_folder(photos, 2)
    run([photos], model, index)
    segment = index / "features" / "000001.bin"
    with segment.open("ab") as f:
        f.write(b"half a record")
    make_photo(photos / "more.png", seed=60)
    run([photos], model, index)
    reader = IndexReader.open(index)
    assert segment.stat().st_size == 3 * reader.manifest.identity.record_bytes
    assert reader.token_features([reader.files()[str(photos / "more.png")]]).shape == (1, 17, 32)


def test_readers_during_a_run_see_the_tables_and_the_same_answers(tmp_path, model, family_model):
    photos, index = tmp_path / "photos", tmp_path / "index"
    make_folder(photos, 4)
    run([photos], model, index)
    query = family_model.encode_texts(["a dog"]).embeddings[0].numpy()
    settled = IndexReader.open(index)
    writer = IndexWriter.open(index, model.info)  # a run starts (or is killed before it finishes)
    during = IndexReader.open(index)
    writer.close()
    assert settled.from_snapshot and not during.from_snapshot and during.interrupted
    assert during.recall(query, 4) == settled.recall(query, 4)
    assert during.files() == settled.files()
    keys = [h for h, _ in settled.recall(query, 4)]
    np.testing.assert_array_equal(during.token_features(keys), settled.token_features(keys))


def test_readers_during_a_run_leave_out_images_whose_files_it_removed(tmp_path, model, family_model):
    """A run removes an image whose last file went only as it finishes: until then (or for good, where it was
    killed) such images took places in a query's top N and were dropped for want of a file, so `--top 3` gave
    2 results, and a query for a removed picture none."""
    photos, index = tmp_path / "photos", tmp_path / "index"
    make_folder(photos, 4)
    run([photos], model, index)
    query = family_model.encode_texts(["a dog"]).embeddings[0].numpy()
    gone = str(photos / "img002.png")
    writer = IndexWriter.open(index, model.info)
    writer.delete_files([gone])  # as a run does, before it is killed
    writer.close()
    during = IndexReader.open(index)
    assert not during.from_snapshot and during.counts() == (3, 3)
    assert len(during.recall(query, 3)) == 3 and gone not in during.files()


def test_decoding_threads_default_to_one_on_the_cpu_and_two_beside_a_gpu(tmp_path, tiny_model, monkeypatch):
    import types

    import torch

    from blipsearch.indexer import pipeline

    assert pipeline.default_workers(tiny_model) == 1
    assert pipeline.default_workers(types.SimpleNamespace(device=torch.device("cuda"))) == 2
    asked = []
    real = pipeline.bounded_map

    def recording(fn, items, workers, **kwargs):
        asked.append(workers)
        return real(fn, items, workers, **kwargs)

    monkeypatch.setattr(pipeline, "bounded_map", recording)
    make_folder(tmp_path / "photos", 3)
    for workers, index in ((None, "a"), (3, "b")):
        store = IndexWriter.open(tmp_path / index, tiny_model.info)
        try:
            summary = index_folders([tmp_path / "photos"], tiny_model, store,
                                    IndexOptions(batch_size=2, progress=False, workers=workers))
        finally:
            store.close()
        assert summary.indexed == 3
    assert asked == [1, 3]
