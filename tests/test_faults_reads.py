"""Reads that cannot hang or exhaust memory: special files, huge files, stuck reads, Ctrl-C, symlinks, HEIC."""

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from blipsearch.indexer import pipeline, scan
from blipsearch.indexer.images import check_header, load_image
from blipsearch.indexer.pipeline import IndexOptions, index_folders
from blipsearch.indexer.readahead import TooManyStuck, bounded_map
from blipsearch.indexer.reader import IndexReader
from blipsearch.indexer.store import IndexWriter
from blipsearch.retrieval.cli import main
from blipsearch.retrieval.errors import ImageLoadError
from blipsearch.retrieval.models.base import Preprocessing

from photos import make_folder, make_photo, png_bomb

PRE = Preprocessing(height=16, width=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CLI = [sys.executable, "-m", "blipsearch.retrieval.cli"]


def index(folder, model, index_dir, **options):
    store = IndexWriter.open(index_dir, model.info)
    try:
        return index_folders([folder], model, store, IndexOptions(batch_size=2, progress=False, **options))
    finally:
        store.close()


def sparse(path, size):
    with open(path, "wb") as file:
        file.truncate(size)  # no disk used
    return path


def unix_socket(path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    return server


# ---- 1. only regular files are read -----------------------------------------------------------------------

def test_special_files_and_links_to_them_are_skipped_with_a_reason(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    make_folder(photos, 2)
    os.mkfifo(photos / "pipe.jpg")
    (photos / "zero.jpg").symlink_to("/dev/zero")
    (photos / "to-pipe.png").symlink_to(photos / "pipe.jpg")
    server = unix_socket(photos / "s.png")
    try:
        summary = index(photos, tiny_model, tmp_path / "index")
    finally:
        server.close()
    assert dict(summary.skipped) == {
        str(photos / "pipe.jpg"): "not a regular file (a FIFO)",
        str(photos / "to-pipe.png"): "not a regular file (a FIFO)",
        str(photos / "zero.jpg"): "not a regular file (a character device)",
        str(photos / "s.png"): "not a regular file (a socket)",
    }
    assert summary.indexed == 2


def test_a_fifo_swapped_in_after_the_scan_is_refused_without_blocking(tmp_path, tiny_model, monkeypatch):
    photos = tmp_path / "photos"
    make_folder(photos, 2)
    found = scan.scan([photos])
    (photos / "img001.png").unlink()
    os.mkfifo(photos / "img001.png")  # opened for reading without O_NONBLOCK, this waits for a writer forever
    monkeypatch.setattr(pipeline, "scan", lambda roots: found)
    started = time.monotonic()
    summary = index(photos, tiny_model, tmp_path / "index")
    assert summary.skipped == [(str(photos / "img001.png"), "not a regular file (a FIFO)")]
    assert time.monotonic() - started < 10
    with pytest.raises(ImageLoadError, match=re.escape("not a regular file (a FIFO)")):
        load_image(photos / "img001.png", PRE)  # the query, eval and training reader too


def test_a_file_that_can_no_longer_be_decoded_leaves_the_index_and_is_counted_as_removed(tmp_path, tiny_model):
    """Its stale row was deleted while the summary said "removed 0"."""
    photos = tmp_path / "photos"
    make_folder(photos, 3)
    assert index(photos, tiny_model, tmp_path / "index").indexed == 3
    data = (photos / "img001.png").read_bytes()
    (photos / "img001.png").write_bytes(data[:len(data) // 2])  # cut short: it no longer decodes
    summary = index(photos, tiny_model, tmp_path / "index")
    assert (summary.removed, summary.unchanged, len(summary.skipped)) == (1, 2, 1)
    assert summary.skipped[0][1].endswith("; the version indexed before left the index")
    assert str(photos / "img001.png") not in IndexReader.open(tmp_path / "index").files()


def test_the_cli_names_special_and_huge_files_and_exits_3(tmp_path, tiny_model_dir):
    photos = tmp_path / "photos"
    make_folder(photos, 2)
    os.mkfifo(photos / "aaa.jpg")
    (photos / "zero.jpg").symlink_to("/dev/zero")
    sparse(photos / "scan.tif", 30 << 30)
    result = CliRunner().invoke(main, ["index", str(photos), "--model", str(tiny_model_dir), "-q", "--device", "cpu",
                                       "--index", str(tmp_path / "index")])
    assert result.exit_code == 3, result.output
    assert f"skipped {photos / 'aaa.jpg'}: not a regular file (a FIFO)\n" in result.stderr
    assert f"skipped {photos / 'zero.jpg'}: not a regular file (a character device)\n" in result.stderr
    assert f"skipped {photos / 'scan.tif'}: file too large (30.0 GiB; the limit is 1.0 GiB)\n" in result.stderr
    assert "indexed 2, " in result.stderr


# ---- 2. size and header before reading whole ----------------------------------------------------------------

def test_a_file_over_the_size_limit_is_refused_unread_also_when_it_grew_after_the_scan(tmp_path, tiny_model,
                                                                                       monkeypatch):
    photos = tmp_path / "photos"
    make_folder(photos, 2)
    found = scan.scan([photos])
    monkeypatch.setattr(pipeline, "scan", lambda roots: found)
    monkeypatch.setattr(scan, "MAX_FILE_BYTES", 1 << 20)
    sparse(photos / "img001.png", 3 << 20)  # grew since the scan
    summary = index(photos, tiny_model, tmp_path / "index")
    assert summary.skipped == [(str(photos / "img001.png"), "file too large (3.0 MiB; the limit is 1.0 MiB)")]


def test_the_pixel_count_is_checked_from_the_header_before_the_file_is_read(tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png")
    with open(bomb, "ab") as file:
        file.truncate(200 << 20)  # 200 MB behind the header
    with scan.open_regular(bomb) as file:
        with pytest.raises(ImageLoadError, match=re.escape("decompression bomb: 10,000.0 megapixels")):
            check_header(file, bomb)
        assert file.tell() < 1 << 20


def test_the_streamed_hash_is_the_hash_of_the_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(scan, "READ_CHUNK", 1000)
    path = make_photo(tmp_path / "a.png", seed=1, size=(300, 200))
    with scan.open_regular(path) as file:
        data, digest = scan.read_hashed(file)
    assert data == path.read_bytes()
    assert scan.content_hash(path) == digest == scan.hash_bytes(path.read_bytes())


# ---- 3. a stuck read never stops the run, Ctrl-C always ends it ---------------------------------------------

DRIVER = """
import os, signal, sys

# as a terminal's foreground process: a suite started as a background job (`pytest &`) passes on an ignored SIGINT
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
from blipsearch.indexer import pipeline
from blipsearch.retrieval.cli import main

fifo, marker, timeout = sys.argv[1:4]
real_open = pipeline.open_regular

def open_regular(path):
    if str(path).endswith("zz-stuck.png"):  # as a hung network drive: blocked in the kernel for good
        Path(marker).touch()
        open(fifo, "rb")
    return real_open(path)

pipeline.open_regular = open_regular
if timeout != "-":
    pipeline.READ_TIMEOUT_S = float(timeout)
main(sys.argv[4:], prog_name="blipsearch")
"""


def start_stuck_run(tmp_path, tiny_model_dir, timeout: str) -> tuple[subprocess.Popen, object]:
    photos = tmp_path / "photos"
    make_folder(photos, 4)
    make_photo(photos / "zz-stuck.png", seed=50)
    os.mkfifo(tmp_path / "never-written")
    (tmp_path / "driver.py").write_text(DRIVER)
    command = [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "never-written"), str(tmp_path / "stuck"),
               timeout, "index", str(photos), "--model", str(tiny_model_dir), "--index", str(tmp_path / "index"),
               "--batch-size", "2", "--device", "cpu", "-q"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), photos


def wait_until(condition, process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


def committed_files(index_dir) -> int:
    try:
        return len(IndexReader.open(index_dir).files())
    except Exception:  # not created yet, or a commit under way
        return 0


def test_ctrl_c_ends_a_run_stuck_in_a_read_within_seconds_with_exit_130(tmp_path, tiny_model_dir):
    process, photos = start_stuck_run(tmp_path, tiny_model_dir, timeout="-")
    wait_until(lambda: (tmp_path / "stuck").exists() and committed_files(tmp_path / "index") == 4, process)
    time.sleep(0.3)  # the encoder now waits for the stuck file
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert time.monotonic() - started < 5
    assert "interrupted; finished batches are kept in the index" in stderr
    assert sorted(IndexReader.open(tmp_path / "index").files()) == [str(photos / f"img{i:03d}.png") for i in range(4)]


def test_a_read_that_does_not_answer_is_skipped_after_the_timeout(tmp_path, tiny_model_dir):
    process, photos = start_stuck_run(tmp_path, tiny_model_dir, timeout="5")  # ample for a slow machine's reads
    try:
        _, stderr = process.communicate(timeout=60)  # the stuck thread does not keep the process alive
    finally:
        process.kill()
    assert process.returncode == 3, stderr
    assert f"skipped {photos / 'zz-stuck.png'}: read timed out (no answer in 5 s; a hung drive?)" in stderr
    assert "indexed 4, " in stderr


@pytest.fixture
def release():
    """An event the stuck calls of a test wait on; set at its end so that their threads finish."""
    event = threading.Event()
    yield event
    event.set()


def test_bounded_map_keeps_order_and_gives_the_timeout_result_in_place(release):
    def slow(n):
        if n == 3:
            release.wait()
        time.sleep(0.01 * (n % 3))
        return n * 10

    out = list(bounded_map(slow, range(8), workers=2, ahead=4, timeout=0.3, on_timeout=lambda n: -n))
    assert out == [0, 10, 20, -3, 40, 50, 60, 70]


def test_bounded_map_stops_after_too_many_stuck_calls_and_passes_errors_on(release):
    with pytest.raises(TooManyStuck):
        list(bounded_map(lambda n: release.wait(), range(10), workers=2, timeout=0.1, on_timeout=lambda n: n,
                         max_stuck=2))

    def fails(n):
        raise ValueError(n)

    with pytest.raises(ValueError):
        list(bounded_map(fails, range(3), workers=2))


def test_bounded_map_without_workers_never_runs_ahead():
    started, taken = [], []

    def record(n):
        started.append(n)
        return n

    for n in bounded_map(record, range(6), workers=0, ahead=10):
        assert started == [*taken, n]  # nothing started before the previous result was taken
        taken.append(n)


# ---- 4. decoding one image has a memory bound -----------------------------------------------------------------

def write_png(path, width: int, height: int, mode: str) -> None:
    """A valid RGBA or palette (with transparency) PNG, written a row at a time: tiny file, many pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    color_type, channels = {"RGBA": (6, 4), "P": (3, 1)}[mode]
    extra = chunk(b"PLTE", bytes(range(256)) * 3) + chunk(b"tRNS", bytes(range(256))) if mode == "P" else b""
    row = b"\0" + bytes(range(256)) * (width * channels // 256) + b"\x80" * (width * channels % 256)
    compressor = zlib.compressobj(1)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", data) + chunk(b"IEND", b""))


PEAK = """
import resource, sys
from blipsearch.indexer.images import load_image
from blipsearch.retrieval.models.base import Preprocessing

pre = Preprocessing(height=384, width=384, mean=(0.5,) * 3, std=(0.5,) * 3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
load_image(sys.argv[1], pre, reduced_decode=sys.argv[2] == "1")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)  # Linux: KiB
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
@pytest.mark.parametrize("mode", ["RGBA", "P"])
@pytest.mark.parametrize("reduced, bytes_per_pixel", [(True, 5), (False, 9)])
def test_decoding_one_image_stays_within_its_memory_bound(tmp_path, mode, reduced, bytes_per_pixel):
    """Measured: reduced (`index`'s default) 4.2 bytes a pixel, exact 8.2 (RGBA); it was 24 before bands."""
    pixels = 6000 * 5000
    write_png(tmp_path / "big.png", 6000, 5000, mode)
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "big.png"), str(int(reduced))],
                         capture_output=True, text=True, check=True).stdout
    assert int(out) < bytes_per_pixel * pixels + (20 << 20), f"{int(out) / pixels:.1f} bytes a pixel"


# ---- 5. symlinked folders, Pillow's warnings, a killed batch --------------------------------------------------

def test_linked_folders_are_followed_and_a_loop_is_named_once(tmp_path, caplog):
    make_photo(tmp_path / "elsewhere" / "a.png", seed=1)
    root = tmp_path / "photos"
    make_photo(root / "sub" / "b.png", seed=2)
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    (root / "sub" / "up").symlink_to(root)  # a loop
    (tmp_path / "elsewhere" / "back").symlink_to(root)  # a loop through the other link
    found = scan.scan([root])
    assert [f.path for f in found.files] == [str(root / "linked" / "a.png"), str(root / "sub" / "b.png")]
    assert sorted(r.getMessage() for r in caplog.records) == [
        f"not following {root / 'linked' / 'back'}: it leads back to {root}, which holds it (a loop)",
        f"not following {root / 'sub' / 'up'}: it leads back to {root}, which holds it (a loop)",
    ]
    assert found.skipped == []


def test_links_that_cannot_be_followed_and_unreadable_folders_are_skipped_in_one_line(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    """A loop of links (ELOOP from `is_dir`) once ended the whole run with a traceback; a folder that cannot
    be listed was named but left the exit status at 0. What is stored from either stays."""
    photos = tmp_path / "photos"
    make_folder(photos, 2)
    (photos / "self.jpg").symlink_to(photos / "self.jpg")
    (photos / "loop").symlink_to(photos / "loop")  # a folder's name as much as a file's
    (photos / "closed").mkdir()
    make_photo(photos / "closed" / "c.png", seed=3)
    closed, real_scandir = str(photos / "closed"), os.scandir

    def scandir(path):  # as a folder without read permission lists for a user other than root
        if str(path) == closed:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(scan.os, "scandir", scandir)
    found = scan.scan([photos])
    assert [f.path for f in found.files] == [str(photos / f"img00{i}.png") for i in range(2)]
    assert found.unreadable_dirs == [closed, str(photos / "loop"), str(photos / "self.jpg")]
    assert found.skipped == [
        (closed, "cannot read this folder (Permission denied); its files are neither added nor removed"),
        *((str(photos / name), "cannot follow this link (Too many levels of symbolic links); what is stored "
                               "from it stays") for name in ("loop", "self.jpg"))]
    result = CliRunner().invoke(main, ["index", str(photos), "--model", str(tiny_model_dir), "-q", "--device", "cpu",
                                       "--index", str(tmp_path / "index")])
    assert result.exit_code == 3, result.output
    assert f"skipped {closed}: cannot read this folder" in result.stderr
    assert f"skipped {photos / 'self.jpg'}: cannot follow this link" in result.stderr
    assert "Traceback" not in result.output
    assert "indexed 2, " in result.stderr


def test_a_linked_folder_that_can_no_longer_be_followed_keeps_its_stored_files(tmp_path, tiny_model):
    """Taken for a file without an image name, it was dropped without a word and its files were removed."""
    photos = tmp_path / "photos"
    make_folder(tmp_path / "elsewhere", 2)
    make_folder(photos, 1)
    (photos / "linked").symlink_to(tmp_path / "elsewhere")
    assert index(photos, tiny_model, tmp_path / "index").indexed == 3
    (photos / "linked").unlink()
    (photos / "linked").symlink_to(photos / "linked")  # as a dead mount answers: it cannot be followed
    summary = index(photos, tiny_model, tmp_path / "index")
    assert (summary.removed, summary.unchanged) == (0, 1)
    assert summary.skipped == [(str(photos / "linked"), "cannot follow this link (Too many levels of symbolic "
                                                        "links); what is stored from it stays")]
    assert len(IndexReader.open(tmp_path / "index").files()) == 3


def test_a_linked_folder_whose_target_is_gone_keeps_its_stored_files(tmp_path, tiny_model):
    """A link to an unplugged drive: its files were removed without a word, and encoded again once it was back."""
    photos, drive = tmp_path / "photos", tmp_path / "usb"
    make_folder(drive, 2)
    make_folder(photos, 1)
    (photos / "usb").symlink_to(drive)
    assert index(photos, tiny_model, tmp_path / "index").indexed == 3
    drive.rename(tmp_path / "unplugged")
    summary = index(photos, tiny_model, tmp_path / "index")
    assert (summary.removed, summary.unchanged) == (0, 1)
    assert summary.skipped == [(str(photos / "usb"), "this link leads nowhere now (its target is gone: an "
                                                     "unplugged drive?); what is stored from it stays (--allow-empty "
                                                     "removes it)")]
    assert len(IndexReader.open(tmp_path / "index").files()) == 3
    (tmp_path / "unplugged").rename(drive)
    (photos / "notes.txt").symlink_to(tmp_path / "nowhere.txt")  # dangling, but nothing stored from it: no word
    back = index(photos, tiny_model, tmp_path / "index")
    assert (back.indexed, back.unchanged, back.removed, back.skipped) == (0, 3, 0, [])
    drive.rename(tmp_path / "unplugged")  # gone for good: --allow-empty removes its files
    assert index(photos, tiny_model, tmp_path / "index", allow_empty=True).removed == 2


def corrupt_exif_jpeg(path):
    """A JPEG whose EXIF says a tag's data is longer than the EXIF block: Pillow warns, and decodes it."""
    exif = Image.Exif()
    exif[0x010E] = "x" * 40  # ImageDescription, stored behind the entry
    raw = bytearray(exif.tobytes())
    entry = raw.find(struct.pack(">H", 0x010E))
    raw[entry + 4:entry + 8] = struct.pack(">L", 5000)  # its byte count
    Image.new("RGB", (32, 32), (200, 10, 10)).save(path, exif=bytes(raw))
    return path


def test_pillow_warnings_name_their_file_in_a_fresh_process(tmp_path):
    paths = [corrupt_exif_jpeg(tmp_path / "a.jpg"), corrupt_exif_jpeg(tmp_path / "b.jpg")]
    probe = textwrap.dedent(f"""
        import logging, sys
        from concurrent.futures import ThreadPoolExecutor
        from blipsearch.indexer.images import load_image
        from blipsearch.retrieval.models.base import Preprocessing
        logging.basicConfig(format="%(message)s")
        pre = Preprocessing(height=16, width=16, mean=(0.5,) * 3, std=(0.5,) * 3)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda p: load_image(p, pre), {[str(p) for p in paths]!r}))
    """)
    stderr = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stderr
    assert sorted(stderr.splitlines()) == [f"{p}: Tag data larger than file. Skipping tag 270" for p in paths]


def test_an_index_run_names_the_file_of_a_metadata_warning_once(tmp_path, tiny_model_dir):
    """Its date and camera are read apart from its pixels: that read's warning came out raw, without the file
    (Python's two-line form), and the same warning once per read."""
    from io import BytesIO

    data = BytesIO()
    Image.new("RGB", (32, 32), "red").save(data, "JPEG", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "odd.jpg").write_bytes(data.getvalue())
    result = subprocess.run([sys.executable, "-m", "blipsearch.retrieval.cli", "index", str(tmp_path / "photos"),
                             "--model", str(tiny_model_dir), "--index", str(tmp_path / "index"), "-q"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if not line.startswith("blipsearch: indexed")]
    assert len(warned) == 1 and warned[0].startswith(f"blipsearch: {tmp_path / 'photos' / 'odd.jpg'}: Corrupt EXIF")


class KilledAfterFeatures:
    """A store that dies after its first batch's features, before that batch's file rows (as kill -9 there)."""

    def __init__(self, store):
        self.store = store

    def __getattr__(self, name):
        return getattr(self.store, name)

    def upsert_files(self, records):
        raise KeyboardInterrupt


def test_files_whose_features_a_killed_run_stored_count_as_indexed_not_moved(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    make_folder(photos, 5)
    store = IndexWriter.open(tmp_path / "index", tiny_model.info)
    with pytest.raises(KeyboardInterrupt):
        index_folders([photos], tiny_model, KilledAfterFeatures(store), IndexOptions(batch_size=2, progress=False))
    store.close()
    summary = index(photos, tiny_model, tmp_path / "index")
    assert (summary.indexed, summary.reused, summary.unchanged) == (5, 0, 0)
    (photos / "copy.png").write_bytes((photos / "img000.png").read_bytes())
    assert index(photos, tiny_model, tmp_path / "index").reused == 1


# ---- 6. HEIC wherever images are decoded ----------------------------------------------------------------------

def heic(path, seed: int = 0):
    import pillow_heif

    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), np.uint8)
    pillow_heif.from_pillow(Image.fromarray(pixels)).save(path, quality=90)
    return path


def fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          check=True).stdout


def test_finding_formats_registers_nothing():
    assert fresh("""
        from PIL import Image
        from blipsearch.indexer.scan import supported_extensions
        assert ".heic" in supported_extensions()
        print("HEIF" in Image.OPEN)
    """).strip() == "False"


def test_query_by_a_heic_image_in_a_fresh_process(tmp_path, tiny_model_dir):
    photos = tmp_path / "photos"
    make_folder(photos, 3)
    photo = heic(photos / "phone.HEIC")
    where = ["--index", str(tmp_path / "index"), "--device", "cpu"]
    subprocess.run([*CLI, "index", str(photos), "--model", str(tiny_model_dir), "-q", *where], check=True)
    out = subprocess.run([*CLI, "query", "--image", str(photo), "--paths", "--top", "1", *where],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [str(photo)]


def test_eval_reads_heic_in_a_fresh_process(tmp_path):
    heic(tmp_path / "a.heic")
    assert fresh(f"""
        from pathlib import Path
        import numpy as np
        from blipsearch.retrieval.eval_cache import decoded_batches
        from blipsearch.retrieval.models.base import Preprocessing
        pre = Preprocessing(height=16, width=16, mean=(0.5,) * 3, std=(0.5,) * 3)
        rows, pixels = next(decoded_batches(Path({str(tmp_path)!r}), ["a.heic"], np.array([0]), pre, 1, 1))
        print(pixels[0].shape)
    """).strip() == "(16, 16, 3)"


def test_training_reads_heic_in_a_fresh_process(tmp_path):
    """From an annotation file's list, as for COCO or Flickr: no folder scan runs first."""
    heic(tmp_path / "a.heic")
    assert fresh(f"""
        from pathlib import Path
        from blipsearch.retrieval.models.base import Preprocessing
        from blipsearch.training.data import CaptionDataset, Sample
        pre = Preprocessing(height=16, width=16, mean=(0.5,) * 3, std=(0.5,) * 3)
        item = CaptionDataset([Sample(Path({str(tmp_path / "a.heic")!r}), "a phone photo", 0, 0)], pre)[0]
        print(tuple(item["pixels"].shape), item["caption"])
    """).strip() == "(16, 16, 3) a phone photo"


def test_storage_that_does_not_answer_keeps_what_is_stored_and_stops_the_run(tmp_path, tiny_model, monkeypatch):
    """A network error reading S3 photos was "cannot decode", and deleted the stored row of every file whose
    listing had changed (re-uploaded): an unreachable endpoint emptied the index, file by file, without end."""
    import errno

    from blipsearch.indexer import pipeline
    from blipsearch.retrieval.errors import StoreError

    photos = tmp_path / "photos"
    paths = make_folder(photos, 18)
    assert index(photos, tiny_model, tmp_path / "index").indexed == 18
    for path in paths:
        os.utime(path, ns=(1, 2_000_000_000))  # changed as far as the listing tells: every file is read again
    real = pipeline.open_regular

    def failing(path, names=(str(paths[0]), str(paths[1]))):
        if str(path) in names:
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    monkeypatch.setattr(pipeline, "open_regular", failing)
    summary = index(photos, tiny_model, tmp_path / "index")
    assert (summary.removed, summary.unchanged, len(summary.skipped)) == (0, 16, 2)
    assert summary.skipped[0] == (str(paths[0]), "cannot be read now ([Errno 5] Input/output error); what is "
                                                 "stored from it stays")
    assert len(IndexReader.open(tmp_path / "index").files()) == 18
    for path in paths:
        os.utime(path, ns=(1, 3_000_000_000))
    monkeypatch.setattr(pipeline, "open_regular", lambda path: failing(path, names=[str(p) for p in paths]))
    with pytest.raises(StoreError, match=r"^16 files in a row could not be read \(each named above\), e\.g\. "
                                         r".*: is the storage reachable\?"):
        index(photos, tiny_model, tmp_path / "index")
    assert len(IndexReader.open(tmp_path / "index").files()) == 18
