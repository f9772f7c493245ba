"""The index-time captioner: tiny BLIP captioning checkpoints saved here, loaded by path as users load theirs,
and compared with what transformers' own `BlipForConditionalGeneration.generate` writes for the same pixels."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from blipsearch.retrieval.errors import FieldError, ModelLoadError
from blipsearch.retrieval.models.captioner import Captioner, load_captioner
from blipsearch.retrieval.models.preprocessing import normalise

from tiny import save_tiny_blip

BLIP_DECODING = dict(num_beams=3, max_new_tokens=20, min_new_tokens=1)  # the captioner's defaults


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory) -> Path:
    """A random tiny `BlipForConditionalGeneration` (32 px), as a hub captioner: no caption_prompt in its config."""
    return save_tiny_blip(tmp_path_factory.mktemp("tiny-captioner"), model_class="BlipForConditionalGeneration")


@pytest.fixture(scope="module")
def captioner(captioner_dir) -> Captioner:
    return load_captioner(str(captioner_dir), device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def pixels() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]


def transformers_captions(directory: Path, pixels: list[np.ndarray], prompt: str) -> list[str]:
    """As the model card says to caption: the processor's pixels and prompt, `generate`, decode, and BLIP's
    `caption[len(prompt):]`."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(directory).eval()
    processor = BlipProcessor.from_pretrained(directory)
    inputs = processor(images=pixels, text=[prompt] * len(pixels) if prompt else None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, **BLIP_DECODING)
    decoded = processor.batch_decode(out, skip_special_tokens=True)
    assert all(text.startswith(prompt.strip()) for text in decoded)
    return [" ".join(text[len(prompt):].split()) for text in decoded]


@pytest.mark.parametrize("prompt", [None, ""])
def test_captions_equal_transformers_generate_with_the_prompt_cut_off(captioner_dir, captioner, pixels, prompt):
    if prompt is not None:  # "" = unconditional: transformers' generate without input_ids
        captioner = load_captioner(str(captioner_dir), device="cpu", precision="fp32", prompt=prompt)
    expected_prompt = "a picture of " if prompt is None else prompt  # BLIP's, for a config that names none
    assert captioner.info.prompt == expected_prompt
    assert captioner.info.model_id == str(captioner_dir.resolve()) and captioner.info.revision.startswith("sha256:")
    assert (captioner.info.preprocessing.height, captioner.info.preprocessing.width) == (32, 32)
    captions = captioner.caption(pixels)
    assert captions == transformers_captions(captioner_dir, pixels, expected_prompt)
    assert len(captions) == 3 and all(captions) and len(set(captions)) == 3
    assert not any(c.startswith("a picture") for c in captions) or prompt == ""


def test_a_batch_captions_as_its_images_one_by_one(captioner, pixels):
    assert captioner.caption(pixels) == [captioner.caption([image])[0] for image in pixels]
    assert captioner.caption([]) == []


def test_a_failing_image_loses_its_caption_only(captioner, pixels, monkeypatch, caplog):
    expected = captioner.caption(pixels)
    pre = captioner.info.preprocessing
    bad = normalise(torch.from_numpy(pixels[1][None]), pre.mean, pre.std)
    generate, calls = captioner.model.generate, []

    def failing(pixel_values, **kwargs):  # a batch holding image 1 fails, as a kernel error would
        calls.append(pixel_values.shape[0])
        if any(torch.equal(row, bad[0]) for row in pixel_values):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        return generate(pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(captioner.model, "generate", failing)
    with caplog.at_level(logging.INFO, logger="blipsearch.retrieval.models.captioner"):
        assert captioner.caption(pixels) == [expected[0], None, expected[2]]
    assert calls == [3, 1, 1, 1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["an image could not be captioned: CUDA error: an illegal memory access was encountered"]


def test_a_retrieval_checkpoint_is_refused_in_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError) as refused:
        load_captioner(str(tiny_model_dir), device="cpu", precision="fp32")
    message = str(refused.value)
    assert "\n" not in message and str(tiny_model_dir) in message and "BlipForImageTextRetrieval" in message
    assert "Salesforce/blip-image-captioning-base" in message
    # without `architectures` in its config, its weights give it away: the decoder would stay random
    plain = Path(shutil.copytree(tiny_model_dir, tmp_path / "plain"))
    config = json.loads((plain / "config.json").read_text())
    del config["architectures"]
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no trained weights for text_decoder"):
        load_captioner(str(plain), device="cpu", precision="fp32")
    other = tmp_path / "blip2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "blip-2",
                                                   "architectures": ["Blip2ForImageTextRetrieval"]}))
    with pytest.raises(ModelLoadError, match="a Blip2ForImageTextRetrieval checkpoint, not a BLIP or BLIP-2 captioner"):
        load_captioner(str(other), device="cpu")
    (other / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ModelLoadError, match="of type 'clip', not a BLIP or BLIP-2 captioner"):
        load_captioner(str(other), device="cpu")


def test_options_are_checked(captioner_dir):
    with pytest.raises(FieldError, match="min_new_tokens"):
        load_captioner(str(captioner_dir), device="cpu", min_new_tokens=30)
    with pytest.raises(FieldError, match="prompt 'a zebra of' has words"):
        load_captioner(str(captioner_dir), device="cpu", prompt="a zebra of")


def test_a_captioner_exported_by_training_captions_after_its_prompt(tmp_path, pixels):
    from blipsearch.training.config import load_config
    from blipsearch.training.export import export_captioner
    from blipsearch.training.model import build_model
    from blipsearch.training.tokenizer import special_ids, word_tokenizer

    cfg = load_config(None, ["model.preset=tiny", "objective.queue_size=6", "objective.caption_prompt=a picture of "])
    tokenizer = word_tokenizer(["a picture of a red circle", "a blue square"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.objective, special_ids(tokenizer, prompt=cfg.objective.caption_prompt))
    directory = export_captioner(model.eval(), tokenizer, tmp_path / "captioner")
    captioner = load_captioner(str(directory), device="cpu", precision="fp32")
    assert captioner.info.prompt == "a picture of"  # as the export's config says
    assert captioner.caption(pixels) == transformers_captions(directory, pixels, "a picture of")
    # trained without a prompt, the export says "" and the captioner generates unconditionally, not after BLIP's
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"caption_prompt": ""}))
    assert load_captioner(str(directory), device="cpu", precision="fp32").info.prompt == ""
