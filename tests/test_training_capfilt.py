"""CapFilt with a tiny trained captioner and filter: what is kept, and the JSON it writes."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_training_export import trained  # noqa: F401  (the module's fixture)

from blipsearch.retrieval.annotations import load_annotations
from blipsearch.training.cli import cli


def _capfilt(source: Path, out: Path, run: Path, *extra: str):
    result = CliRunner().invoke(cli, ["capfilt", str(source), str(out), "--captioner", str(run / "captioner"),
                                      "--filter", str(run / "retrieval"), "--device", "cpu", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_threshold_zero_keeps_web_and_synthetic_captions(trained, tmp_path):  # noqa: F811
    source = trained.parent / "data" / "val.json"
    out = tmp_path / "clean.json"
    output = _capfilt(source, out, trained, "--threshold", "0", "--samples", "2")
    entries = json.loads(out.read_text())
    web = [c for item in load_annotations(source) for c in item.captions]
    assert [e["caption"] for e in entries if e["source"] == "web"] == web
    assert sum(e["source"] == "synthetic" for e in entries) == 2 * 4
    assert "kept 4" not in output and f"kept {len(web)}/{len(web)} web and 8/8 synthetic" in output
    # the cleaned file is training data again, with image paths relative to the same folder
    assert {item.image for item in load_annotations(out)} == {item.image for item in load_annotations(source)}


def test_threshold_one_keeps_nothing_and_a_caption_folder_works(trained, tmp_path):  # noqa: F811
    folder = tmp_path / "photos"
    folder.mkdir()
    image = next((trained.parent / "data" / "images" / "val").glob("*.png"))
    (folder / "p.png").write_bytes(image.read_bytes())
    (folder / "p.txt").write_text("a red circle\n")
    out = tmp_path / "none.json"
    assert "kept 0/1 web and 0/1 synthetic" in _capfilt(folder, out, trained, "--threshold", "1")
    assert json.loads(out.read_text()) == []


def test_an_absolute_image_path_of_the_source_stays_absolute(trained, tmp_path):  # noqa: F811
    """relative_to raised a traceback after every image before it was captioned, and nothing was written."""
    source = trained.parent / "data" / "val.json"
    entries = json.loads(source.read_text())[:2]
    elsewhere = tmp_path / "elsewhere" / "x.png"  # outside the images' root
    elsewhere.parent.mkdir()
    elsewhere.write_bytes((trained.parent / "data" / "images" / entries[1]["image"]).read_bytes())
    absolute = entries[1]["image"] = str(elsewhere.resolve())
    (tmp_path / "abs.json").write_text(json.dumps(entries))
    out = tmp_path / "clean.json"
    _capfilt(tmp_path / "abs.json", out, trained, "--threshold", "0", "--images",
             str(trained.parent / "data" / "images"))
    assert {e["image"] for e in json.loads(out.read_text())} == {entries[0]["image"], absolute}


def test_a_source_none_of_whose_images_is_found_names_the_images_root(trained, tmp_path):  # noqa: F811
    """It wrote an empty JSON and exited 3, with no word of --images."""
    source = trained.parent / "data" / "val.json"
    result = CliRunner().invoke(cli, ["capfilt", str(source), str(tmp_path / "out.json"), "--captioner",
                                      str(trained / "captioner"), "--filter", str(trained / "retrieval"), "--device",
                                      "cpu", "--images", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert f"--images names the folder its image paths start in (now {tmp_path})" in result.output
    assert not (tmp_path / "out.json").exists()


def test_a_retrieval_checkpoint_is_refused_as_captioner(tiny_model_dir):
    import pytest
    import torch

    from blipsearch.retrieval.errors import ModelLoadError
    from blipsearch.training.capfilt import Captioner

    with pytest.raises(ModelLoadError, match="no trained text_decoder"):
        Captioner(str(tiny_model_dir), torch.device("cpu"))


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    """It was a FileNotFoundError traceback after every image had been captioned and filtered."""
    from blipsearch.retrieval.errors import InvalidInputError
    from blipsearch.training.capfilt import capfilt

    (tmp_path / "source.json").write_text("[]")
    for out, message in ((tmp_path / "nodir" / "x.json", "no folder"), (tmp_path, "is a folder"),
                         (tmp_path / "source.json", "is the source itself")):
        with pytest.raises(InvalidInputError, match=message):
            capfilt(str(tmp_path / "source.json"), out, None, None)  # refused before either model is used
