"""Our text tower (SDPA, folded cross-attention) against transformers' BLIP text encoder, fp32."""

import pytest
import torch
from transformers import BlipForImageTextRetrieval

from blipsearch.retrieval.models.blip_text import BlipTextTower, TextTowerConfig

TEXTS = ["a red dog on the beach", "a cat", "a photo of a blue car in the sea"]  # unequal lengths: padding


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    reference = BlipForImageTextRetrieval.from_pretrained(tiny_model_dir).eval()
    tower = BlipTextTower(TextTowerConfig.from_blip_config(reference.config.to_dict())).eval()
    tower.load_weights(reference.state_dict())
    return reference, tower


def test_unimodal_embeddings_equal_transformers(pair, tiny_model):
    reference, tower = pair
    tokens = tiny_model.tokenize(TEXTS)
    assert not tokens.attention_mask.all()
    with torch.no_grad():
        hidden = reference.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        expected = torch.nn.functional.normalize(reference.text_proj(hidden.last_hidden_state[:, 0]), dim=-1)
        ours = tower.embed_texts(tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_folded_cross_attention_equals_the_plain_computation(pair, tiny_model):
    reference, tower = pair
    tokens = tiny_model.tokenize(TEXTS)
    ids = tokens.input_ids.clone()
    ids[:, 0] = tiny_model.enc_token_id
    image = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        hidden = reference.text_encoder(input_ids=ids, attention_mask=tokens.attention_mask,
                                        encoder_hidden_states=image,
                                        encoder_attention_mask=torch.ones(3, 17, dtype=torch.long))
        expected = reference.itm_head(hidden.last_hidden_state[:, 0])
        ours = tower.itm_logits(ids, tokens.attention_mask, image)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert expected.std() > 0.05  # the logits vary across pairs: the comparison has teeth


def test_missing_tensors_are_named(tiny_model_dir):
    reference = BlipForImageTextRetrieval.from_pretrained(tiny_model_dir)
    tower = BlipTextTower(TextTowerConfig.from_blip_config(reference.config.to_dict()))
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("itm_head")}
    with pytest.raises(KeyError, match="itm_head"):
        tower.load_weights(state)
    assert tower.text_proj.weight.data_ptr() != reference.text_proj.weight.data_ptr()  # all or nothing


def test_one_image_against_many_texts_equals_repeating_it(pair, tiny_model):
    _, tower = pair
    tokens = tiny_model.tokenize(TEXTS)
    image = torch.randn(1, 17, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        shared = tower.itm_logits(tokens.input_ids, tokens.attention_mask, image)
        repeated = tower.itm_logits(tokens.input_ids, tokens.attention_mask, image.expand(3, -1, -1))
    torch.testing.assert_close(shared, repeated, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("words", ["a dog", "two children building a sandcastle near the sea"])
def test_the_query_benchmarks_itm_flop_count_equals_the_flops_torch_counts(tiny_model_dir, monkeypatch, words):
    """benchmarks/bench_query.py turns ITM time into a fraction of the matmul peak with `itm_gflops`; the
    count must be what the text tower executes (torch's FlopCounterMode, gelu unfused and attention through
    the math backend so that it sees every matmul; neither it nor the formula counts softmax or layer norms)."""
    from benchmark_scripts import script
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from blipsearch.retrieval.models import layers, load_model

    monkeypatch.setattr(layers, "_fused_linear_available", lambda: False)
    model = load_model(str(tiny_model_dir), torch.device("cpu"), "fp32", with_vision=False)  # torch counts its own
    tokens = model.tokenize([words])
    features = torch.randn(5, 17, model.text.config.image_hidden_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.itm_scores(tokens, features)
    expected = script("bench_query").itm_gflops(model.text.config, int(tokens.attention_mask.sum()), 17, 5) * 1e9
    head = 5 * 2 * model.text.config.hidden_size * 2  # the ITM head, left out of the formula
    assert counter.get_total_flops() == pytest.approx(expected + head, rel=1e-9)
