"""Captions, dates and cameras through the index: written once per content, kept through moves and copies,
added to an index made without them, failures that cost the caption and never the image; and tables of an
older blipsearch upgraded in place."""

import hashlib
import shutil
from pathlib import Path

import lancedb
import numpy as np
import pytest

from blipsearch.indexer import pipeline, snapshot
from blipsearch.indexer.layout import FILES, IMAGES
from blipsearch.indexer.metadata import local_wall_clock
from blipsearch.indexer.pipeline import CaptionerSource, IndexOptions, index_folders
from blipsearch.indexer.reader import IndexReader
from blipsearch.indexer.store import IndexWriter

from photos import exif_photo, make_folder


class FakeCaptioner:
    """Captions an image by a digest of its pixels; fails on the images whose digest is in `fail`."""

    def __init__(self, preprocessing, fail=()):
        self.info = type("Info", (), {"preprocessing": preprocessing})()
        self.fail = set(fail)
        self.captioned = 0

    @staticmethod
    def level(pixels: np.ndarray) -> str:
        return hashlib.sha256(pixels.tobytes()).hexdigest()[:8]

    def caption(self, pixels):
        self.captioned += len(pixels)
        return [None if self.level(p) in self.fail else f"grey level {self.level(p)}" for p in pixels]


class Counting:
    """The model, counting the images it encodes."""

    def __init__(self, model):
        self.model, self.encoded = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode_images(self, pixels):
        self.encoded += len(pixels)
        return self.model.encode_images(pixels)


def run(folder: Path, index: Path, model, captioner=None, name="fake"):
    """One indexing run; returns (summary, how many times the captioner was loaded)."""
    loads = []

    def load():
        loads.append(1)
        return captioner

    source = CaptionerSource(name, load) if captioner is not None else None
    store = IndexWriter.open(index, model.info)
    try:
        summary = index_folders([folder], model, store, IndexOptions(progress=False, captioner=source))
    finally:
        store.close()
    return summary, len(loads)


def captions(index: Path) -> dict[str, str | None]:
    """path -> caption, as a query reads them."""
    reader = IndexReader.open(index)
    assert reader.from_snapshot
    return {path: reader.caption(digest) for path, digest in reader.files().items()}


def test_captions_are_written_once_per_content_and_kept_through_moves_and_copies(tmp_path, tiny_model):
    photos = make_folder(tmp_path / "photos", 4)
    shutil.copy(photos[0], tmp_path / "photos" / "copy.png")
    captioner = FakeCaptioner(tiny_model.info.preprocessing)
    summary, loads = run(tmp_path / "photos", tmp_path / "index", tiny_model, captioner)
    assert (summary.indexed, summary.captioned, captioner.captioned, loads) == (5, 4, 4, 1)
    first = captions(tmp_path / "index")
    assert all(c and c.startswith("grey level") for c in first.values())
    assert first[str(tmp_path / "photos" / "copy.png")] == first[str(photos[0])]
    assert len(set(first.values())) == 4

    photos[1].rename(tmp_path / "photos" / "moved.png")
    summary, loads = run(tmp_path / "photos", tmp_path / "index", tiny_model, captioner)
    assert (summary.reused, summary.captioned, loads) == (1, 0, 0)  # nothing to caption: never loaded
    assert captions(tmp_path / "index")[str(tmp_path / "photos" / "moved.png")] == first[str(photos[1])]


def test_a_failed_caption_keeps_the_image_and_is_tried_again(tmp_path, tiny_model):
    photos = make_folder(tmp_path / "photos", 3)
    pre = tiny_model.info.preprocessing
    from blipsearch.indexer.images import load_image

    bad = FakeCaptioner.level(load_image(photos[1], pre).pixels)
    summary, _ = run(tmp_path / "photos", tmp_path / "index", tiny_model, FakeCaptioner(pre, fail={bad}))
    assert summary.indexed == 3 and summary.skipped == []
    assert summary.uncaptioned == [(str(photos[1]), "the captioner failed on it")]
    assert captions(tmp_path / "index")[str(photos[1])] is None

    again = FakeCaptioner(pre)
    summary, loads = run(tmp_path / "photos", tmp_path / "index", tiny_model, again)
    assert (summary.captioned, again.captioned, loads, summary.indexed) == (1, 1, 1, 0)
    assert captions(tmp_path / "index")[str(photos[1])] == f"grey level {bad}"


def test_an_index_made_without_captions_gets_them_without_encoding_again(tmp_path, tiny_model):
    make_folder(tmp_path / "photos", 4)
    model = Counting(tiny_model)
    run(tmp_path / "photos", tmp_path / "index", model)
    assert model.encoded == 4 and set(captions(tmp_path / "index").values()) == {None}

    summary, loads = run(tmp_path / "photos", tmp_path / "index", model, FakeCaptioner(tiny_model.info.preprocessing))
    assert (model.encoded, summary.captioned, summary.unchanged, loads) == (4, 4, 4, 1)
    assert all(captions(tmp_path / "index").values())

    other = FakeCaptioner(tiny_model.info.preprocessing)  # another captioner rewrites them
    summary, _ = run(tmp_path / "photos", tmp_path / "index", model, other, name="another")
    assert (summary.captioned, other.captioned, model.encoded) == (4, 4, 4)


def test_dates_and_cameras_are_kept_per_file(tmp_path, tiny_model):
    dated = exif_photo(tmp_path / "photos" / "dated.jpg", 1, "2019:05:04 10:11:12")
    plain = exif_photo(tmp_path / "photos" / "plain.jpg", 2, None, make="NIKON", model="D750")
    run(tmp_path / "photos", tmp_path / "index", tiny_model)
    reader = IndexReader.open(tmp_path / "index")
    files = {f.path: f for fs in reader.files_by_hash(list(reader.files().values())).values() for f in fs}
    assert files[str(dated)].date == 1556964672 and files[str(dated)].exif_dated  # 2019-05-04T10:11:12
    assert files[str(dated)].camera == "Canon EOS 5D"
    assert not files[str(plain)].exif_dated and files[str(plain)].camera == "NIKON D750"
    assert files[str(plain)].date == local_wall_clock(plain.stat().st_mtime_ns)


def test_tables_of_an_older_blipsearch_are_upgraded_without_encoding_again(tmp_path, tiny_model, monkeypatch):
    """Tables without the caption and metadata columns, and a snapshot of format 2: the next run adds the
    columns, reads every file once more for its metadata, and encodes nothing."""
    exif_photo(tmp_path / "photos" / "dated.jpg", 1, "2019:05:04 10:11:12")
    make_folder(tmp_path / "photos", 2)
    model = Counting(tiny_model)
    run(tmp_path / "photos", tmp_path / "index", model)
    db = lancedb.connect(str(tmp_path / "index"))
    db.open_table(FILES).drop_columns(["taken", "camera", "meta"])
    db.open_table(IMAGES).drop_columns(["caption", "captioner"])
    shutil.rmtree(tmp_path / "index" / snapshot.FOLDER)

    old = IndexReader.open(tmp_path / "index")  # queries read such tables until the next run
    assert not old.from_snapshot and old.counts() == (3, 3) and old.caption_count() == 0

    unreadable = str(tmp_path / "photos" / "img000.png")  # an I/O error on the one re-read keeps its row
    opener = pipeline.open_regular

    def failing(path):
        if path == unreadable:
            raise OSError(5, "I/O error")
        return opener(path)

    monkeypatch.setattr(pipeline, "open_regular", failing)
    summary, _ = run(tmp_path / "photos", tmp_path / "index", model)
    assert [path for path, _ in summary.skipped] == [unreadable] and model.encoded == 3
    assert unreadable in IndexReader.open(tmp_path / "index").files()
    monkeypatch.setattr(pipeline, "open_regular", opener)
    summary, _ = run(tmp_path / "photos", tmp_path / "index", model)
    assert (model.encoded, summary.indexed, summary.unchanged) == (3, 0, 3)
    reader = IndexReader.open(tmp_path / "index")
    assert reader.from_snapshot
    dates = [f.date for fs in reader.files_by_hash(list(reader.files().values())).values() for f in fs
             if f.exif_dated]
    assert dates == [1556964672]
    rows = db.open_table(FILES).to_arrow().column("meta").to_pylist()
    assert rows == [True] * 3


@pytest.mark.parametrize("captions_in", [["only one"], [""], ["a", "", "b c"]])
def test_snapshot_round_trip_of_captions_dates_and_cameras(tmp_path, captions_in):
    n = len(captions_in)
    vectors = np.random.default_rng(0).normal(size=(n, 1, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    files = [snapshot.FileRow(f"/p/{i}.jpg", f"h{i}", 10 + i, 10**18, 1556964672 if i == 0 else None,
                              "Canon EOS 5D" if i == 0 else None) for i in range(n)]
    view = snapshot.Snapshot.build([f"h{i}" for i in range(n)], vectors, np.ones(n), np.arange(n), captions_in, files)
    view.save(tmp_path, 7, "model")
    loaded = snapshot.Snapshot.load(tmp_path, 7)
    assert loaded is not None
    assert loaded.captions == captions_in and loaded.cameras == ["Canon EOS 5D"] + [""] * (n - 1)
    assert loaded.dates[0] == 1556964672 and loaded.exif_dated.tolist() == [True] + [False] * (n - 1)
    assert list(loaded.keywords.rows_with_all("jpg")) == list(range(n))
    if captions_in[0]:
        assert loaded.keywords.search(captions_in[0], 1)[0].tolist() == [0]


def test_a_captioner_that_fails_to_load_is_not_remembered(tmp_path, tiny_model_dir):
    """It once stayed in the manifest, so that every later plain run failed on it too. What its config.json
    shows is no captioner (a retrieval checkpoint) is refused before the run starts: at the run's first new
    image it left the run unfinished ("interrupted"), and the process sometimes aborted (exit 134)."""
    from blipsearch.indexer.manifest import read_manifest

    from runner import blipsearch, one_line_error

    make_folder(tmp_path / "photos", 2)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    make_folder(tmp_path / "photos", 3, seed=7)  # new images: the captioner is needed at the first batch
    failed = blipsearch("index", str(tmp_path / "photos"), "--captioner", str(tiny_model_dir), "-q",
                        index=tmp_path / "index", expect=1)
    one_line_error(failed, "the captioner of --captions: model ", "not a BLIP or BLIP-2 captioner", "(--captioner DIR)")
    run = read_manifest(tmp_path / "index").run
    assert (run.captioner, run.writing, run.generation) == (None, False, 1)  # refused before the run began
    damaged = tmp_path / "damaged-captioner"  # a captioner by its config, whose weights fail to load
    shutil.copytree(Path(__file__).parents[1] / "training" / "demo_captioner", damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    failed = blipsearch("index", str(tmp_path / "photos"), "--captioner", str(damaged), "-q",
                        index=tmp_path / "index", expect=1)
    one_line_error(failed, "cannot load the captioner")
    assert read_manifest(tmp_path / "index").run.captioner is None
    blipsearch("index", str(tmp_path / "photos"), "-q", index=tmp_path / "index")
