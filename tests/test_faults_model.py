"""Model-side faults: processor layouts and sizes, model identity, damaged files and bad text.

Each ends in one `ModelLoadError` / `InvalidInputError` line (exit status 1 in the CLI), never a traceback
and never a model silently read with the wrong settings.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from transformers import BlipImageProcessorPil

from blipsearch.indexer.images import load_image
from blipsearch.retrieval.cli import main
from blipsearch.retrieval.errors import InvalidInputError, ModelLoadError
from blipsearch.retrieval.models import load_model, loading, resolve
from blipsearch.retrieval.models.preprocessing import read_preprocessing

from photos import make_folder, make_photo
from tiny import save_tiny_blip

DEMO_MODEL = Path(__file__).resolve().parent.parent / "training" / "demo_model"
DAMAGED = "download the model again or re-export it"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """The file-hash and converted-weights caches live in the test's own user cache dir."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "blipsearch"


@pytest.fixture(scope="module")
def model_64(tmp_path_factory):
    """A 64 px checkpoint saved as transformers 5 saves it (BlipProcessor: processor_config.json only)."""
    return save_tiny_blip(tmp_path_factory.mktemp("m64"), image_size=64)


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def copy_model(source: Path, target: Path) -> Path:
    return Path(shutil.copytree(source, target))


def with_processor_size(source: Path, target: Path, side: int) -> Path:
    """A copy of `source` whose image processor resizes to side x side."""
    directory = copy_model(source, target)
    edit_json(directory / "processor_config.json",
              lambda d: d["image_processor"].update(size={"height": side, "width": side}))
    return directory


# --- image-processor settings -----------------------------------------------------------------------------


def test_a_transformers_5_checkpoint_is_read_at_its_own_size(model_64, tmp_path):
    assert (model_64 / "processor_config.json").is_file()
    assert not (model_64 / "preprocessor_config.json").exists()
    model = load_model(str(model_64), "cpu", "fp32")
    pre = model.info.preprocessing
    assert (pre.height, pre.width) == (64, 64)
    photo = make_photo(tmp_path / "p.png", seed=3, size=(90, 70))
    ours = model.pixel_values([load_image(photo, pre).pixels])
    expected = BlipImageProcessorPil.from_pretrained(model_64)([Image.open(photo)], return_tensors="pt")
    torch.testing.assert_close(ours, expected["pixel_values"], atol=1e-5, rtol=0)
    assert model.encode_images(ours).features.shape == (1, 65, 32)  # 8x8 patches + [CLS]: the tower accepts it


def test_the_older_layout_preprocessor_config_alone_is_read(model_64, tmp_path):
    """Older hub checkpoints (Salesforce/blip-itm-base-coco) hold preprocessor_config.json only."""
    directory = copy_model(model_64, tmp_path / "old")
    (directory / "processor_config.json").unlink()
    BlipImageProcessorPil(size={"height": 64, "width": 64}, image_mean=[0.5, 0.5, 0.5]).save_pretrained(directory)
    pre = read_preprocessing(directory, "old", 64)
    assert (pre.height, pre.width, pre.mean) == (64, 64, (0.5, 0.5, 0.5))


def test_with_both_layouts_the_nested_settings_win_as_in_transformers(model_64, tmp_path):
    directory = copy_model(model_64, tmp_path / "both")
    BlipImageProcessorPil(size={"height": 64, "width": 64}, image_mean=[0.5, 0.5, 0.5]).save_pretrained(directory)
    nested = json.loads((directory / "processor_config.json").read_text())["image_processor"]["image_mean"]
    assert read_preprocessing(directory, "both", 64).mean == tuple(nested) != (0.5, 0.5, 0.5)
    assert list(BlipImageProcessorPil.from_pretrained(directory).image_mean) == nested


def test_without_any_processor_settings_the_vision_size_is_used(model_64, tmp_path):
    directory = copy_model(model_64, tmp_path / "bare")
    (directory / "processor_config.json").unlink()
    pre = read_preprocessing(directory, "bare", 64)
    assert (pre.height, pre.width, pre.resample) == (64, 64, "bicubic")


def test_a_processor_size_that_disagrees_with_the_vision_config_is_refused(model_64, tmp_path):
    directory = with_processor_size(model_64, tmp_path / "wrong", 384)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(directory), "cpu", "fp32")
    message = str(info.value)
    assert str(directory) in message and "384x384" in message and "image_size 64" in message
    assert "re-export" in message and "\n" not in message


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"image_processor": 3}',
                                     b'{"image_processor": {"image_mean": "x"}}'])
def test_a_damaged_processor_config_is_one_line(model_64, tmp_path, content):
    directory = copy_model(model_64, tmp_path / "bad")
    (directory / "processor_config.json").write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"model .*processor_config\.json") as info:
        read_preprocessing(directory, str(directory), 64)
    assert "\n" not in str(info.value)


# --- model identity ---------------------------------------------------------------------------------------


def settled(directory: Path) -> Path:
    """Files written a minute ago: old enough for the hash cache (it skips files still being written)."""
    past = (os.stat(directory).st_mtime_ns // 10**9) - 60
    for path in directory.iterdir():
        os.utime(path, (past, past))
    return directory


def test_negating_one_small_head_changes_the_revision(tmp_path):
    """The demo model's text_proj is 0.1 MB of 15 MB: sampled chunks missed it, a full hash does not."""
    from safetensors.torch import load_file, save_file

    original = copy_model(DEMO_MODEL, tmp_path / "demo")
    other = copy_model(DEMO_MODEL, tmp_path / "other")
    assert loading.fingerprint(original) == loading.fingerprint(other)  # identity is content, not path
    tensors = load_file(other / "model.safetensors")
    tensors["text_proj.weight"] = -tensors["text_proj.weight"]
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    assert loading.fingerprint(original) != loading.fingerprint(other)
    revisions = {load_model(str(d), "cpu", "fp32", with_vision=False).info.revision for d in (original, other)}
    assert len(revisions) == 2


def test_an_unchanged_model_is_not_read_again(tmp_path, monkeypatch, private_cache):
    directory = settled(copy_model(DEMO_MODEL, tmp_path / "demo"))
    read = []
    real_hash = loading.hash_file
    monkeypatch.setattr(loading, "hash_file", lambda path: read.append(path.name) or real_hash(path))
    first = loading.fingerprint(directory)
    assert "model.safetensors" in read and (private_cache / "file-hashes.json").is_file()
    read.clear()
    assert loading.fingerprint(directory) == first and read == []
    os.utime(directory / "model.safetensors", ns=(0, 10**9))  # a new stamp: hashed again
    assert loading.fingerprint(directory) == first and read == ["model.safetensors"]


def test_a_file_still_being_written_is_not_cached(tmp_path, monkeypatch):
    directory = copy_model(DEMO_MODEL, tmp_path / "demo")
    os.utime(directory / "model.safetensors")  # modified just now
    read = []
    real_hash = loading.hash_file
    monkeypatch.setattr(loading, "hash_file", lambda path: read.append(path.name) or real_hash(path))
    loading.fingerprint(directory)
    loading.fingerprint(directory)
    assert read.count("model.safetensors") == 2


@pytest.mark.parametrize("damage", ["garbage", "wrong shape", "unwritable"])
def test_a_damaged_or_unwritable_hash_cache_never_fails_the_load(tmp_path, monkeypatch, private_cache, damage):
    directory = settled(copy_model(DEMO_MODEL, tmp_path / "demo"))
    expected = loading.fingerprint(directory)
    cache = private_cache / "file-hashes.json"
    if damage == "garbage":
        cache.write_bytes(b"\xff\x00{")
    elif damage == "wrong shape":
        cache.write_text(json.dumps({"files": {str((directory / "model.safetensors").resolve()): [1, "x"]}}))
    else:
        shutil.rmtree(private_cache)
        private_cache.write_text("a file where the cache folder should be")
    assert loading.fingerprint(directory) == expected
    if damage != "unwritable":
        assert json.loads(cache.read_text())["files"]  # rewritten whole
    assert not list(private_cache.parent.rglob("*.tmp"))


# --- damaged weights and tokenizer ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1000, "half"])
def test_a_cut_short_safetensors_file_is_one_line(tiny_model_dir, tmp_path, size):
    directory = copy_model(tiny_model_dir, tmp_path / "broken")
    weights = directory / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2 if size == "half" else size)
    for with_vision in (True, False):
        with pytest.raises(ModelLoadError) as info:
            load_model(str(directory), "cpu", "fp32", with_vision=with_vision)
        message = str(info.value)
        assert str(weights) in message and str(directory) in message and DAMAGED in message
        assert "\n" not in message


def test_a_cut_short_pickle_is_one_line(tiny_model_dir, tmp_path):
    from transformers import BlipForImageTextRetrieval

    directory = tmp_path / "bin"
    copy_model(tiny_model_dir, directory)
    (directory / "model.safetensors").unlink()
    torch.save(BlipForImageTextRetrieval.from_pretrained(tiny_model_dir).state_dict(), directory / "pytorch_model.bin")
    os.truncate(directory / "pytorch_model.bin", 1000)
    with pytest.raises(ModelLoadError, match=f"cannot load model {directory}: .*{DAMAGED}"):
        load_model(str(directory), "cpu", "fp32")


def test_a_damaged_converted_copy_in_the_cache_is_rebuilt(tiny_model_dir, tiny_model, tmp_path, private_cache):
    from transformers import BlipForImageTextRetrieval

    directory = tmp_path / "bin"
    copy_model(tiny_model_dir, directory)
    (directory / "model.safetensors").unlink()
    torch.save(BlipForImageTextRetrieval.from_pretrained(tiny_model_dir).state_dict(), directory / "pytorch_model.bin")
    load_model(str(directory), "cpu", "fp32", with_vision=False)
    [converted] = private_cache.rglob("model.safetensors")
    os.truncate(converted, 1000)
    model = load_model(str(directory), "cpu", "fp32", with_vision=False)
    expected = tiny_model.encode_texts(["a red dog"]).embeddings.numpy()
    np.testing.assert_allclose(np.asarray(model.encode_texts(["a red dog"]).embeddings), expected, atol=1e-5, rtol=1e-5)
    assert converted.stat().st_size > 1000


def test_a_damaged_tokenizer_file_is_one_line(tiny_model_dir, tmp_path):
    directory = copy_model(tiny_model_dir, tmp_path / "tok")
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ModelLoadError, match=rf"cannot read {directory / 'tokenizer.json'} .*{DAMAGED}"):
        load_model(str(directory), "cpu", "fp32", with_vision=False)


# --- text that is not UTF-8 -------------------------------------------------------------------------------

BAD_TEXT = "red \udcff circle"  # what Python makes of the argv bytes b"red \xff circle"


def test_text_that_is_not_utf8_is_an_input_error(tiny_model):
    with pytest.raises(InvalidInputError, match=r"^the query text 'red \\xff circle' is not valid UTF-8"):
        tiny_model.encode_texts(["a red dog", BAD_TEXT])
    assert tiny_model.encode_texts(["rouge été 赤い"]).embeddings.shape[0] == 1  # real non-ASCII text is fine


# --- through the command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("faults-cli")
    make_folder(root / "photos", 3)
    result = CliRunner().invoke(main, ["index", str(root / "photos"), "--model", str(tiny_model_dir), "--index",
                                       str(root / "index"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    return root / "index"


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.exit_code == 1, (result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blipsearch: error: "), result.stderr
    assert "Traceback" not in result.output and all(f in lines[0] for f in fragments), lines


def test_cli_query_text_that_is_not_utf8(index):
    result = CliRunner().invoke(main, ["query", BAD_TEXT, "--index", str(index), "--device", "cpu"])
    assert_one_error_line(result, "is not valid UTF-8")


def test_cli_query_with_a_cut_short_model(index, tiny_model_dir, tmp_path):
    broken = copy_model(tiny_model_dir, tmp_path / "broken")
    os.truncate(broken / "model.safetensors", 1000)
    result = CliRunner().invoke(main, ["query", "red", "--index", str(index), "--model", str(broken),
                                       "--device", "cpu"])
    assert_one_error_line(result, str(broken), DAMAGED)


def test_cli_index_with_a_processor_of_the_wrong_size(model_64, tmp_path):
    directory = with_processor_size(model_64, tmp_path / "wrong", 32)
    make_folder(tmp_path / "photos", 1)
    result = CliRunner().invoke(main, ["index", str(tmp_path / "photos"), "--model", str(directory), "--index",
                                       str(tmp_path / "index"), "--device", "cpu", "-q"])
    assert_one_error_line(result, str(directory), "32x32", "image_size 64")


def test_resolve_keeps_local_directories_local(model_64):
    assert resolve(str(model_64)).is_local  # the revision of a directory is its content hash, not a hub commit
    assert loading.revision(resolve(str(model_64)), model_64).startswith("sha256:")


def test_a_model_whose_embeddings_are_not_finite_is_refused_in_one_line(tmp_path):
    """A model exported from a run that diverged: LanceDB refused its NaN vectors with a traceback."""
    from safetensors.torch import load_file, save_file

    model = save_tiny_blip(tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    tensors["vision_proj.weight"] = torch.full_like(tensors["vision_proj.weight"], float("nan"))
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    make_folder(tmp_path / "photos", 2)
    result = CliRunner().invoke(main, ["index", str(tmp_path / "photos"), "--model", str(model), "--index",
                                       str(tmp_path / "index"), "--device", "cpu", "-q"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert "gives embeddings that are not finite numbers (NaN or inf), e.g. for " in result.stderr
