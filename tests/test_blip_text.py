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
