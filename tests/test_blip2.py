"""The BLIP-2 adapter against transformers' `Blip2ForImageTextRetrieval` (fp32, 1e-5), and its loading rules."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer, Blip2ForImageTextRetrieval, Blip2Processor

from blipsearch.indexer import codec
from blipsearch.indexer.images import load_image
from blipsearch.retrieval.errors import ModelLoadError
from blipsearch.retrieval.models import blip2, load_model, loading, resolve
from blipsearch.retrieval.models.blip2_vision import vision_config
from blipsearch.retrieval.models.qformer import QFormerConfig

from photos import make_photo
from precision import assert_within_tolerance_and_same_ranking
from tiny_blip2 import save_tiny_blip2

TEXTS = ["a red dog on the beach", "a cat", "a photo of a blue car in the sea"]  # unequal lengths: padding


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    """8 queries, 32 px images in 8 px patches (17 tokens), cross-attention in layer 0 of 2, and
    `image_token_index` set as in the hub's newer configs."""
    return save_tiny_blip2(tmp_path_factory.mktemp("tiny-blip2"))


@pytest.fixture(scope="module")
def full_queries_dir(tmp_path_factory):
    """BLIP-2's 32 queries and patch 14 (28 px: 5 tokens), cross-attention in every layer, and an older
    config without `image_token_index` (transformers then prepends the query mask itself)."""
    return save_tiny_blip2(tmp_path_factory.mktemp("tiny-blip2-32q"), seed=1, num_query_tokens=32, image_size=28,
                           patch_size=14, cross_attention_frequency=1, image_token=False)


@pytest.fixture(scope="module")
def model(blip2_dir):
    return load_model(str(blip2_dir), "cpu", "fp32")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    return [make_photo(folder / f"p{i}.png", 20 + i, size) for i, size in enumerate([(40, 50), (71, 33), (64, 64)])]


def processor_inputs(directory, paths, texts):
    """What a transformers user feeds the model: the checkpoint's own Blip2Processor output."""
    processor = Blip2Processor.from_pretrained(directory)
    return processor(images=[Image.open(p) for p in paths], text=texts, padding=True, return_tensors="pt")


def reference_scores(directory, paths, texts):
    """(ITC (images, texts), ITM (images, texts, 2)) from transformers' forward, one image at a time."""
    reference = Blip2ForImageTextRetrieval.from_pretrained(directory).eval()
    itc, itm = [], []
    with torch.no_grad():
        for path in paths:
            inputs = processor_inputs(directory, [path] * len(texts), texts)
            itm.append(reference(**inputs, use_image_text_matching_head=True).logits_per_image)  # (N, 2)
            inputs["pixel_values"] = inputs["pixel_values"][:1]
            itc.append(reference(**inputs, use_image_text_matching_head=False).logits_per_image[0])  # (N,)
    return torch.stack(itc), torch.stack(itm)


def our_scores(model, paths, texts):
    pixels = model.pixel_values([load_image(p, model.info.preprocessing).pixels for p in paths])
    images, encoded = model.encode_images(pixels), model.encode_texts(texts)
    itc = (images.embeddings @ encoded.embeddings.T).amax(dim=1)  # max over the queries: (images, texts)
    itm = torch.stack([model.itm_scores(encoded.tokens, images.features[i:i + 1]) for i in range(len(paths))])
    return itc, itm


@pytest.mark.parametrize("which", ["blip2_dir", "full_queries_dir"])
def test_itc_and_itm_equal_transformers(which, photos, request):
    directory = request.getfixturevalue(which)
    model = load_model(str(directory), "cpu", "fp32")
    itc, itm = our_scores(model, photos, TEXTS)
    expected_itc, expected_itm = reference_scores(directory, photos, TEXTS)
    torch.testing.assert_close(itc, expected_itc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(itm, expected_itm, atol=1e-5, rtol=1e-5)
    assert itc.std() > 0.05 and itm[..., 1].std() > 0.05  # the tiny model tells pairs apart: the test has teeth


def test_one_text_against_many_images_equals_pair_by_pair(model, photos):
    """The searcher's call: one text (N=1) against K stored feature maps; and one image against N texts."""
    pixels = model.pixel_values([load_image(p, model.info.preprocessing).pixels for p in photos])
    features, tokens = model.encode_images(pixels).features, model.tokenize(TEXTS)
    pairs = torch.stack([torch.stack([model.itm_scores(model.tokenize([t]), features[i:i + 1])[0] for t in TEXTS])
                         for i in range(len(photos))])  # (images, texts, 2)
    one_text = model.itm_scores(model.tokenize(TEXTS[:1]), features)  # (K, 2)
    one_image = model.itm_scores(tokens, features[1:2])  # (N, 2)
    torch.testing.assert_close(one_text, pairs[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_image, pairs[1], atol=1e-5, rtol=1e-5)


def test_encodings_have_the_contracts_shapes(model, blip2_dir, photos):
    pixels = model.pixel_values([load_image(p, model.info.preprocessing).pixels for p in photos])
    expected = processor_inputs(blip2_dir, photos, TEXTS[:1])["pixel_values"]
    torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0)  # preprocessing = the checkpoint's processor
    images, texts = model.encode_images(pixels), model.encode_texts(TEXTS)
    info = model.info
    assert images.embeddings.shape == (3, info.vectors_per_image, info.embed_dim) == (3, 8, 16)
    assert images.features.shape == (3, info.feature_tokens, info.feature_dim) == (3, 17, 32)
    assert texts.embeddings.shape == (3, info.embed_dim) and texts.embeddings.dtype == torch.float32
    assert torch.allclose(images.embeddings.norm(dim=-1), torch.ones(3, 8))
    assert torch.allclose(texts.embeddings.norm(dim=-1), torch.ones(3))
    reference = Blip2ForImageTextRetrieval.from_pretrained(blip2_dir).eval()
    with torch.no_grad():  # the stored features are the ViT's tokens after its final LayerNorm
        torch.testing.assert_close(images.features, reference.vision_model(pixels).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_tokens_are_berts_without_image_placeholders(model, blip2_dir, photos):
    """We tokenise as LAVIS: [CLS] text [SEP], at most 35 tokens. Blip2Processor prepends one `<image>` per
    query when given images (and the model strips them again): our ids are its ids without them."""
    texts = [*TEXTS, " ".join(["sky"] * 60)]
    ours = model.tokenize(texts)
    tokenizer = AutoTokenizer.from_pretrained(blip2_dir)
    bert = tokenizer(texts, padding="longest", truncation=True, max_length=35, return_tensors="pt")
    torch.testing.assert_close(ours.input_ids, bert["input_ids"])
    torch.testing.assert_close(ours.attention_mask, bert["attention_mask"])
    assert ours.input_ids.shape[1] == 35 and ours.input_ids[3, -1] == tokenizer.sep_token_id
    assert (ours.input_ids[:, 0] == tokenizer.cls_token_id).all()  # [CLS] for ITC and ITM alike
    processed = processor_inputs(blip2_dir, photos[:1] * 3, TEXTS)["input_ids"]
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    assert (processed[:, :8] == image_token).all()
    torch.testing.assert_close(processed[:, 8:], model.tokenize(TEXTS).input_ids)
    assert not (ours.input_ids == image_token).any()


def test_model_info_of_the_hub_checkpoints(tmp_path):
    """Salesforce's config.json files list only what differs from transformers' defaults: the shapes the
    index records come from those defaults (224 px: 257 x 1408 tokens; -coco at 364 px: 677)."""
    hub = {"architectures": ["Blip2ForImageTextRetrieval"], "image_text_hidden_size": 256, "model_type": "blip-2",
           "num_query_tokens": 32, "image_token_index": 30523,
           "qformer_config": {"model_type": "blip_2_qformer", "use_qformer_text_input": True, "vocab_size": 30523},
           "text_config": {"model_type": "opt"}, "vision_config": {"model_type": "blip_2_vision_model"}}
    for image_size, tokens in ((None, 257), (364, 677)):
        config = json.loads(json.dumps(hub))
        if image_size:
            config["vision_config"]["image_size"] = image_size
        directory = tmp_path / str(tokens)
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "BlipImageProcessor", "size": {"height": image_size or 224,
                                                                     "width": image_size or 224}}))
        info = blip2._model_info(resolve(str(directory)), directory, config, vision_config(config))
        assert (info.family, info.embed_dim, info.vectors_per_image) == ("blip-2", 256, 32)
        assert (info.feature_tokens, info.feature_dim) == (tokens, 1408)
        assert (info.preprocessing.height, info.preprocessing.width) == (image_size or 224,) * 2
        vision = vision_config(config)
        assert (vision.num_layers, vision.num_heads, vision.intermediate_size, vision.patch_size) == (39, 16, 6144, 14)
        assert vision.layer_norm_eps == 1e-6
        q = QFormerConfig.from_blip2_config(config)
        assert (q.vocab_size, q.hidden_size, q.num_layers, q.num_query_tokens) == (30523, 768, 12, 32)
        assert (q.image_hidden_size, q.cross_attention_frequency, q.embed_dim) == (1408, 2, 256)


def test_every_checkpoint_tensor_is_used(model, blip2_dir):
    """No tensor of the retrieval checkpoint is left out by our towers (nor any of ours missing from it)."""
    from safetensors import safe_open

    with safe_open(str(blip2_dir / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    ours = set(model.qformer.state_dict()) | {f"vision_model.{k}" for k in model.vision.state_dict()}
    assert ours == stored


def test_text_only_loading_reads_no_vision_tensors(blip2_dir, model, photos, monkeypatch):
    read, real = [], loading.read_tensors

    def spy(*args, **kwargs):
        tensors = real(*args, **kwargs)
        read.extend(tensors)
        return tensors

    monkeypatch.setattr(loading, "read_tensors", spy)
    light = load_model(str(blip2_dir), "cpu", "fp32", with_vision=False)
    assert read and not [k for k in read if k.startswith("vision_model.")]
    assert light.vision is None and light.info == model.info
    with pytest.raises(ModelLoadError, match="without its vision tower"):
        light.encode_images(torch.zeros(1, 3, 32, 32))
    pixels = model.pixel_values([load_image(p, model.info.preprocessing).pixels for p in photos])
    features = model.encode_images(pixels).features
    torch.testing.assert_close(light.encode_texts(TEXTS).embeddings, model.encode_texts(TEXTS).embeddings,
                               atol=0, rtol=0)
    tokens = light.tokenize(TEXTS[:1])
    torch.testing.assert_close(light.itm_scores(tokens, features), model.itm_scores(tokens, features), atol=0, rtol=0)


def test_captioning_checkpoint_is_refused(tmp_path):
    directory = save_tiny_blip2(tmp_path / "opt", model_class="Blip2ForConditionalGeneration")
    with pytest.raises(ModelLoadError, match=r"no trained weights for embeddings, itm_head, text_projection, "
                                             r"vision_projection: it is not a BLIP-2 image-text retrieval"):
        load_model(str(directory), "cpu", "fp32", with_vision=False)


def test_pickled_weights_are_converted_once_then_read_without_transformers(tmp_path, blip2_dir, model, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    directory = tmp_path / "bin"
    directory.mkdir()
    state = Blip2ForImageTextRetrieval.from_pretrained(blip2_dir).state_dict()
    torch.save(state, directory / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        (directory / name).write_bytes((blip2_dir / name).read_bytes())
    load_model(str(directory), "cpu", "fp32")
    assert list((tmp_path / "cache").rglob("model.safetensors"))
    monkeypatch.setattr(loading, "state_via_transformers", lambda *a: pytest.fail("transformers read it again"))
    again = load_model(str(directory), "cpu", "fp32")
    torch.testing.assert_close(again.encode_texts(TEXTS).embeddings, model.encode_texts(TEXTS).embeddings)


# bf16 end to end (ViT in bf16, Q-Former fp32 with bf16 ITM matmuls) against fp32, on the fused score
# ITM class-1 logit + ITC: measured 0.008-0.016 on tiny models of three seeds.
BF16_TOLERANCE = 0.04


@pytest.fixture(scope="module")
def bf16_model(blip2_dir):
    return load_model(str(blip2_dir), "cpu", "bf16")


def test_bf16_scores_stay_within_tolerance_and_keep_the_ranking(model, bf16_model):
    assert_within_tolerance_and_same_ranking(model, bf16_model, TEXTS[0], BF16_TOLERANCE, min_apart=21)


def test_bf16_keeps_the_qformer_weights_and_itc_passes_in_fp32(model, bf16_model):
    """As transformers keeps the Q-Former fp32: only the ViT is cast, and only ITM's matmuls run in bf16."""
    assert bf16_model.vision.post_layernorm.weight.dtype == torch.bfloat16
    assert {p.dtype for p in bf16_model.qformer.parameters()} == {torch.float32}
    torch.testing.assert_close(bf16_model.encode_texts(TEXTS).embeddings, model.encode_texts(TEXTS).embeddings,
                               atol=0, rtol=0)
    features = model.encode_images(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))).features
    torch.testing.assert_close(bf16_model.qformer.embed_images(features), model.qformer.embed_images(features),
                               atol=0, rtol=0)
    tokens = model.tokenize(TEXTS[:1])
    error = (bf16_model.itm_scores(tokens, features) - model.itm_scores(tokens, features)).abs().max()
    assert 0 < error < 0.02  # measured 0.008-0.009 (three seeds): the bf16 matmuls do run, and stay close


def test_int8_stored_features_keep_itm_scores_close(model):
    """The index keeps the ViT tokens as int8 with a per-channel scale (indexer/codec.py)."""
    pixels = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    features = model.encode_images(pixels).features
    t, h = features.shape[1:]
    restored = torch.stack([torch.from_numpy(codec.unpack(p.values, p.scale, p.offset, t, h))
                            for p in codec.pack(features)])
    tokens = model.tokenize(TEXTS[:1])
    exact, packed = model.itm_scores(tokens, features), model.itm_scores(tokens, restored)
    assert (exact - packed).abs().max() < 0.01
    assert F.cosine_similarity(model.qformer.embed_images(restored), model.qformer.embed_images(features),
                               dim=-1).min() > 0.999
