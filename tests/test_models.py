"""The BLIP adapter against transformers' own classes (fp32, tight tolerance)."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer, BlipForImageTextRetrieval, BlipImageProcessorPil

from blipsearch.indexer.images import load_image
from blipsearch.retrieval.errors import ModelLoadError
from blipsearch.retrieval.models import load_model

from precision import assert_within_tolerance_and_same_ranking
from tiny import save_tiny_blip

TEXTS = ["a red dog on the beach", "a photo of a cat", "a blue car"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    paths = []
    for i, size in enumerate([(50, 40), (33, 71), (64, 64)]):
        path = folder / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return BlipForImageTextRetrieval.from_pretrained(tiny_model_dir).eval()


def copy_all_but_weights(source: Path, target: Path) -> None:
    for path in source.iterdir():
        if path.suffix == ".json":
            (target / path.name).write_bytes(path.read_bytes())


def hf_pixels(model_dir, paths):
    processor = BlipImageProcessorPil.from_pretrained(model_dir)
    return processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]


def test_preprocessing_equals_the_checkpoints_image_processor(tiny_model, tiny_model_dir, photos):
    ours = tiny_model.pixel_values([load_image(p, tiny_model.info.preprocessing).pixels for p in photos])
    torch.testing.assert_close(ours, hf_pixels(tiny_model_dir, photos), atol=1e-5, rtol=0)


def test_itc_embeddings_match_transformers(tiny_model, tiny_model_dir, reference, photos):
    pixels = hf_pixels(tiny_model_dir, photos)
    images = tiny_model.encode_images(pixels)
    texts = tiny_model.encode_texts(TEXTS)
    tokens = AutoTokenizer.from_pretrained(tiny_model_dir)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():  # transformers computes image_feat @ text_feat.T of normalised projections
        expected = torch.stack([
            reference(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                      pixel_values=pixels[i:i + 1], use_itm_head=False).itm_score[0]
            for i in range(len(photos))])
    ours = images.embeddings[:, 0, :] @ texts.embeddings.T
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(images.embeddings.norm(dim=-1), torch.ones(len(photos), 1))
    assert ours.std() > 0.05  # the tiny model tells images apart: the test could fail


def test_itm_logits_match_transformers_with_the_enc_token(tiny_model, tiny_model_dir, reference, photos):
    """transformers feeds [CLS] to the ITM pass; BLIP was trained with [ENC]: we feed [ENC]."""
    pixels = hf_pixels(tiny_model_dir, photos)
    features = tiny_model.encode_images(pixels).features
    tokens = tiny_model.encode_texts(TEXTS[:1]).tokens
    ours = tiny_model.itm_scores(tokens, features)  # one text against three images
    enc_ids = tokens.input_ids.clone()
    enc_ids[:, 0] = tiny_model.enc_token_id
    assert tiny_model.enc_token_id == AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        with_enc = torch.cat([reference(input_ids=enc_ids, attention_mask=tokens.attention_mask,
                                        pixel_values=pixels[i:i + 1]).itm_score for i in range(len(photos))])
        with_cls = torch.cat([reference(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                        pixel_values=pixels[i:i + 1]).itm_score for i in range(len(photos))])
    torch.testing.assert_close(ours, with_enc, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, with_cls, atol=1e-3)  # the convention is visible in the scores


def test_enc_token_falls_back_to_the_row_after_dec(tmp_path):
    """Hub conversions of BLIP may lack [ENC] in the tokenizer; BLIP gives it the id after [DEC]."""
    model = load_model(str(save_tiny_blip(tmp_path / "m", with_enc=False)), "cpu", "fp32")
    assert model.tokenizer.token_id("[ENC]") is None
    assert model.enc_token_id == model.tokenizer.token_id("[DEC]") + 1


def test_batches_of_texts_and_images_agree_with_single_items(tiny_model, tiny_model_dir, photos):
    pixels = hf_pixels(tiny_model_dir, photos)
    batch = tiny_model.encode_images(pixels)
    single = tiny_model.encode_images(pixels[1:2])
    torch.testing.assert_close(batch.embeddings[1:2], single.embeddings, atol=1e-5, rtol=0)
    texts = tiny_model.encode_texts(TEXTS)
    alone = tiny_model.encode_texts(TEXTS[2:])
    torch.testing.assert_close(texts.embeddings[2:], alone.embeddings, atol=1e-5, rtol=0)


def test_bf16_embeddings_stay_close_to_fp32(tiny_model_dir, tiny_model, photos):
    bf16 = load_model(str(tiny_model_dir), "cpu", "bf16")
    pixels = hf_pixels(tiny_model_dir, photos)
    cos = F.cosine_similarity(bf16.encode_images(pixels).embeddings, tiny_model.encode_images(pixels).embeddings,
                              dim=-1)
    assert cos.min() > 0.99


def test_captioning_checkpoint_is_refused(tmp_path):
    directory = save_tiny_blip(tmp_path / "captioner", model_class="BlipForConditionalGeneration")
    with pytest.raises(ModelLoadError, match=r"no trained weights for .*itm_head.*not an image-text retrieval"):
        load_model(str(directory), "cpu", "fp32")


def test_other_model_types_are_refused(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16))
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    with pytest.raises(ModelLoadError, match="type 'clip'"):
        load_model(str(tmp_path / "clip"), "cpu", "fp32")


def test_missing_directory_and_bad_names_are_one_line_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an existing directory nor a hub id"):
        load_model(str(tmp_path / "nope" / "model"), "cpu", "fp32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        load_model(str(tmp_path / "empty"), "cpu", "fp32")


def test_uncached_hub_model_offline_is_one_line_without_traceback(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "BLIPSEARCH_INDEX": str(tmp_path / "index")}
    photos = tmp_path / "photos"
    photos.mkdir()
    result = subprocess.run([sys.executable, "-m", "blipsearch.retrieval.cli", "index", str(photos), "--model",
                             "Salesforce/blip-itm-base-coco"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "blipsearch: error: cannot load model Salesforce/blip-itm-base-coco: it is not in the local Hugging Face "
        "cache and the hub cannot be reached; pass the path of a local copy of it instead"]


def test_text_only_loading_gives_the_same_model(tiny_model_dir, tiny_model, photos):
    """A text-only load of the torch adapter reads the text side from safetensors alone; results and identity
    are the same (the numpy text side, which a "cpu" fp32 load gives: tests/test_blip_text_numpy.py)."""
    light = load_model(str(tiny_model_dir), torch.device("cpu"), "fp32", with_vision=False)
    assert light.info == tiny_model.info and light.vision is None
    expected = tiny_model.encode_texts(TEXTS).embeddings
    torch.testing.assert_close(light.encode_texts(TEXTS).embeddings, expected, atol=0, rtol=0)
    features = tiny_model.encode_images(hf_pixels(tiny_model_dir, photos)).features
    torch.testing.assert_close(light.itm_scores(light.tokenize(TEXTS[:1]), features),
                               tiny_model.itm_scores(tiny_model.tokenize(TEXTS[:1]), features), atol=0, rtol=0)


def test_tokenizer_ids_equal_transformers(tiny_model, tiny_model_dir):
    reference = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["A RED dog, on the beach!", "cat", " ".join(["sky"] * 60), "unknownword a-b"]
    ours = tiny_model.tokenize(texts)
    expected = reference(texts, padding="longest", truncation=True, max_length=35, return_tensors="pt")
    torch.testing.assert_close(ours.input_ids, expected["input_ids"])
    torch.testing.assert_close(ours.attention_mask, expected["attention_mask"])
    assert ours.input_ids.shape[1] == 35


def test_a_checkpoint_without_tokenizer_json_tokenizes_through_transformers_alike(tiny_model_dir, tmp_path):
    """Slow-tokenizer files only (vocab.txt): transformers builds the tokenizer, ours configures a copy of it."""
    from blipsearch.retrieval.models.tokenizer import TextTokenizer

    vocab = sorted(AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab().items(), key=lambda kv: kv[1])
    slow = tmp_path / "slow"
    shutil.copytree(tiny_model_dir, slow)
    (slow / "tokenizer.json").unlink()
    (slow / "vocab.txt").write_text("\n".join(token for token, _ in vocab) + "\n")
    texts = ["A RED dog, on the beach!", " ".join(["sky"] * 60)]
    fast, via_transformers = TextTokenizer.load(tiny_model_dir, "fast"), TextTokenizer.load(slow, "slow")
    np.testing.assert_array_equal(via_transformers.arrays(texts).input_ids, fast.arrays(texts).input_ids)
    assert via_transformers.arrays(texts).input_ids.shape == (2, 35)


def test_preprocessing_defaults_are_blips():
    from blipsearch.retrieval.models.preprocessing import PROCESSOR_DEFAULTS

    processor = BlipImageProcessorPil()
    assert "size" not in PROCESSOR_DEFAULTS  # the vision config's image_size is the default size
    assert PROCESSOR_DEFAULTS["image_mean"] == list(processor.image_mean)
    assert PROCESSOR_DEFAULTS["image_std"] == list(processor.image_std)
    assert PROCESSOR_DEFAULTS["resample"] == int(processor.resample)
    assert PROCESSOR_DEFAULTS["rescale_factor"] == processor.rescale_factor


def test_checkpoints_with_pytorch_bin_weights_load(tmp_path, tiny_model_dir, tiny_model):
    """Older hub repositories ship pytorch_model.bin only: those load through transformers."""
    directory = tmp_path / "bin"
    directory.mkdir()
    torch.save(BlipForImageTextRetrieval.from_pretrained(tiny_model_dir).state_dict(), directory / "pytorch_model.bin")
    copy_all_but_weights(tiny_model_dir, directory)
    model = load_model(str(directory), "cpu", "fp32", with_vision=False)  # either runtime: compare as arrays
    np.testing.assert_allclose(np.asarray(model.encode_texts(TEXTS).embeddings),
                               tiny_model.encode_texts(TEXTS).embeddings.numpy(), atol=1e-5, rtol=1e-5)


BF16_TOLERANCE = 0.03  # fused ITM + ITC score, bf16 end to end against fp32 (measured ~0.011 on the tiny model)


def test_bf16_scores_stay_within_tolerance_and_keep_the_ranking(tiny_model_dir, tiny_model):
    """The bf16 path (vision tower, stored features, ITM) against the fp32 computation."""
    bf16 = load_model(str(tiny_model_dir), "cpu", "bf16")
    assert_within_tolerance_and_same_ranking(tiny_model, bf16, TEXTS[0], BF16_TOLERANCE)


def test_a_config_that_does_not_fit_the_weights_is_one_line(tmp_path, tiny_model_dir):
    import json
    import shutil

    directory = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3  # the weights have 2
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"does not fit its config\.json"):
        load_model(str(directory), "cpu", "fp32")


def test_pickled_weights_are_converted_once_then_read_without_transformers(tmp_path, tiny_model_dir, tiny_model,
                                                                          monkeypatch):
    from blipsearch.retrieval.models import loading

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    directory = tmp_path / "bin"
    directory.mkdir()
    torch.save(BlipForImageTextRetrieval.from_pretrained(tiny_model_dir).state_dict(), directory / "pytorch_model.bin")
    copy_all_but_weights(tiny_model_dir, directory)
    load_model(str(directory), "cpu", "fp32")
    assert list((tmp_path / "cache").rglob("model.safetensors"))
    monkeypatch.setattr(loading, "state_via_transformers", lambda *a: pytest.fail("transformers read it again"))
    again = load_model(str(directory), "cpu", "fp32")
    torch.testing.assert_close(again.encode_texts(TEXTS).embeddings, tiny_model.encode_texts(TEXTS).embeddings)


def test_a_hub_repository_with_pickles_only_downloads_them(tmp_path, tiny_model_dir, monkeypatch):
    """Salesforce's BLIP repositories hold pytorch_model.bin only: the download asks for it then."""
    import huggingface_hub

    from blipsearch.retrieval.models import loading

    snapshot = tmp_path / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    asked = []

    def fake_download(repo_id, local_files_only=False, allow_patterns=None):
        if local_files_only:
            raise FileNotFoundError("not cached")
        asked.append(allow_patterns)
        if "pytorch_model*.bin" in allow_patterns:
            (snapshot / "pytorch_model.bin").write_bytes(b"weights")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(loading, "hub_reachable", lambda: True)
    directory = loading.local_directory(loading.resolve("Salesforce/blip-itm-base-coco"))
    assert directory == snapshot and (directory / "pytorch_model.bin").exists()
    assert len(asked) == 2 and "*.safetensors" in asked[0]
    assert loading.revision(loading.resolve("Salesforce/blip-itm-base-coco"), directory) == "0123abcd"


def test_weights_are_read_as_stored_cast_by_prefix_and_not_left_mapped(tiny_model_dir, tmp_path):
    """read_tensors equals safetensors' own reader; `dtypes` casts by name prefix as it reads; and no tensor
    keeps the file memory-mapped (a mapped file keeps every page a load touched resident: 4.6 GB for ViT-g)."""
    import shutil

    from safetensors.torch import load_file

    from blipsearch.retrieval.models import loading

    directory = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))  # a file no other test has open
    ours = loading.read_tensors(directory, "tiny", ("vision_model.", "itm_head."), {"vision_model.": torch.bfloat16})
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(directory.resolve()) not in maps.read_text()
    expected = load_file(directory / "model.safetensors")
    assert set(ours) == {k for k in expected if k.startswith(("vision_model.", "itm_head."))}
    for key, tensor in ours.items():
        want = expected[key].to(torch.bfloat16) if key.startswith("vision_model.") else expected[key]
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), key


def test_weights_cast_as_they_are_read_equal_the_stored_tensors_cast_afterwards(tiny_model_dir):
    """Tensors that get cast are read through one reused staging buffer; each must still be its own."""
    from blipsearch.retrieval.models.loading import read_tensors

    prefixes = ("text_encoder", "vision_model")
    stored = read_tensors(tiny_model_dir, "tiny", prefixes)
    cast = read_tensors(tiny_model_dir, "tiny", prefixes, {"text_encoder": torch.bfloat16})
    assert stored.keys() == cast.keys() and len({t.numel() for t in stored.values()}) > 3  # sizes vary
    assert {t.dtype for k, t in stored.items() if k.startswith("text_encoder")} == {torch.float32}  # so they get cast
    for key, tensor in stored.items():
        expected = tensor.bfloat16() if key.startswith("text_encoder") else tensor
        assert cast[key].dtype == expected.dtype and torch.equal(cast[key], expected), key
