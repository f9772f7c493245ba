"""The pre-training model: encoder/decoder sharing, momentum encoders, queues, the [ENC] convention."""

import pytest
import torch

from blipsearch.training.config import load_config
from blipsearch.training.model import build_model
from blipsearch.training.objectives import Batch, BlipObjective, Progress
from blipsearch.training.tokenizer import special_ids, word_tokenizer

CAPTIONS = ["a red circle left of a blue square", "a small green triangle", "a blue square above a red circle"]


def tiny(overrides=()):
    # no dropout: the tests compare passes and processes that would draw different masks
    cfg = load_config(None, ["model.preset=tiny", "objective.queue_size=6", "model.text_dropout=0.0", *overrides])
    tokenizer = word_tokenizer(CAPTIONS)
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.objective, special_ids(tokenizer)), tokenizer, cfg


def batch_of(tokenizer, captions=CAPTIONS, image_ids=None, seed=0):
    torch.manual_seed(seed)
    tokens = tokenizer(captions, padding="longest", return_tensors="pt")
    n = len(captions)
    return Batch(torch.randn(n, 3, 32, 32), tokens["input_ids"], tokens["attention_mask"],
                 torch.tensor(image_ids or list(range(n))), torch.arange(n))


def test_decoder_shares_everything_but_self_attention():
    model, _, _ = tiny()
    encoder, decoder = model.text_encoder, model.text_decoder.bert
    assert decoder.embeddings is encoder.embeddings
    for enc, dec in zip(encoder.encoder.layer, decoder.encoder.layer, strict=True):
        for name in ("crossattention", "intermediate", "output"):
            assert getattr(dec, name) is getattr(enc, name)
        assert dec.attention is not enc.attention
        assert dec.attention.self.query.weight.data_ptr() != enc.attention.self.query.weight.data_ptr()
    assert model.text_decoder.cls.predictions.decoder.weight is encoder.embeddings.word_embeddings.weight
    # the decoder's own parameters: self-attention blocks and the LM head transform/bias only
    shared = {id(p) for p in encoder.parameters()}
    own = [n for n, p in model.text_decoder.named_parameters() if id(p) not in shared]
    assert own and all(".attention." in n or n.startswith("cls.") for n in own)


def test_vision_tower_starts_with_usable_weights():
    """transformers' BlipVisionConfig default (std 1e-10) suits loading only; from scratch it stalls ITC."""
    model, _, _ = tiny()
    assert model.config.vision_config.initializer_range == 0.02
    assert float(model.vision_model.encoder.layers[0].mlp.fc1.weight.detach().std()) > 0.01


def test_lm_gradient_reaches_shared_encoder_weights():
    model, tokenizer, cfg = tiny(["objective.losses={lm: 1.0}"])
    losses = BlipObjective(cfg.objective)(model, batch_of(tokenizer), Progress(0, 0.0, 0))
    assert set(losses) == {"lm_loss"}
    losses["lm_loss"].backward()
    assert model.text_encoder.encoder.layer[0].intermediate.dense.weight.grad.abs().sum() > 0
    assert model.text_encoder.encoder.layer[0].attention.self.query.weight.grad is None  # encoder-only block


def test_momentum_update_is_an_exponential_average_without_gradient():
    model, _, _ = tiny()
    for _online, momentum in model.momentum_modules():
        assert all(not p.requires_grad for p in momentum.parameters())
    before = model.vision_proj_m.weight.clone()
    with torch.no_grad():
        model.vision_proj.weight.add_(1.0)
    model.momentum_update()
    torch.testing.assert_close(model.vision_proj_m.weight, 0.995 * before + 0.005 * model.vision_proj.weight)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in trainable for _, m in model.momentum_modules() for p in m.parameters())


def test_queue_is_first_in_first_out_and_wraps():
    model, _, _ = tiny()  # queue of 6
    feats = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    model.enqueue(feats, feats, torch.tensor([10, 11, 12, 13]))
    assert model.idx_queue.tolist() == [10, 11, 12, 13, -100, -100] and int(model.queue_ptr) == 4
    model.enqueue(feats, feats, torch.tensor([20, 21, 22, 23]))
    assert model.idx_queue.tolist() == [22, 23, 12, 13, 20, 21] and int(model.queue_ptr) == 2
    torch.testing.assert_close(model.image_queue[4], feats[0])


def test_itc_enqueues_the_momentum_features_and_counts_queue_positives():
    model, tokenizer, cfg = tiny(["objective.losses={itc: 1.0}", "objective.alpha=0.0"])
    objective = BlipObjective(cfg.objective)
    batch = batch_of(tokenizer, image_ids=[5, 6, 7])
    objective(model, batch, Progress(0, 0.0, 0))
    assert model.idx_queue[:3].tolist() == [5, 6, 7]
    with torch.no_grad():
        _, expected = model.encode_image(batch.pixel_values, momentum=True)
    torch.testing.assert_close(model.image_queue[:3], expected)


def test_alpha_ramps_over_the_first_epoch():
    _, _, cfg = tiny()
    objective = BlipObjective(cfg.objective)
    assert objective.alpha(Progress(0, 0.0, 0)) == 0.0
    assert objective.alpha(Progress(5, 0.5, 0)) == pytest.approx(0.2)
    assert objective.alpha(Progress(50, 3.0, 0)) == pytest.approx(0.4)


def test_itm_reads_the_enc_token_at_position_zero():
    model, tokenizer, _ = tiny()
    batch = batch_of(tokenizer)
    embeds, _ = model.encode_image(batch.pixel_values)
    ids = batch.input_ids.clone()
    ids[:, 0] = tokenizer.convert_tokens_to_ids("[ENC]")
    hidden = model.text_encoder(input_ids=ids, attention_mask=batch.attention_mask, encoder_hidden_states=embeds,
                                encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
    expected = model.itm_head(hidden.last_hidden_state[:, 0])
    torch.testing.assert_close(model.itm_logits(batch.input_ids, batch.attention_mask, embeds), expected)
    assert model.ids.enc == tokenizer.convert_tokens_to_ids("[ENC]") != tokenizer.cls_token_id


def test_objective_returns_named_weighted_losses():
    model, tokenizer, cfg = tiny(["objective.losses={itc: 1.0, itm: 2.0, lm: 0.5}"])
    batch = batch_of(tokenizer)
    losses = BlipObjective(cfg.objective)(model, batch, Progress(0, 0.0, 0))
    assert set(losses) == {"itc_loss", "itm_loss", "lm_loss"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    model2, _, cfg2 = tiny(["objective.losses={itc: 1.0, itm: 1.0, lm: 1.0}"])
    plain = BlipObjective(cfg2.objective)(model2, batch, Progress(0, 0.0, 0))
    torch.testing.assert_close(losses["itm_loss"], 2.0 * plain["itm_loss"])
    torch.testing.assert_close(losses["lm_loss"], 0.5 * plain["lm_loss"])


def test_text_dropout_follows_blip_and_the_pretraining_preset_follows_its_recipe():
    from pathlib import Path

    model, _, _ = tiny(["model.text_dropout=0.1"])
    assert model.text_encoder.config.hidden_dropout_prob == 0.1  # BLIP's med_config
    assert model.text_encoder.config.attention_probs_dropout_prob == 0.1
    assert load_config(None, []).model.text_dropout == 0.1
    preset = Path(__file__).parents[1] / "training" / "configs" / "blip-base-pretrain.yaml"
    cfg = load_config(preset, [])
    assert cfg.objective.alpha_ramp_epochs == 2.0  # pretrain.py: alpha ramps over the first 2 epochs
    assert tuple(cfg.data.crop_scale) == (0.2, 1.0) and cfg.data.randaugment and cfg.data.hflip


def mae_sincos(grid: int, width: int):
    """MAE's `get_2d_sincos_pos_embed(width, grid, cls_token=True)`, written after its numpy code."""
    import numpy as np

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    mesh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # (w, h)
    codes = np.concatenate([one_d(width // 2, mesh[0]), one_d(width // 2, mesh[1])], axis=1)
    return np.concatenate([np.zeros([1, width]), codes], axis=0)


def test_sincos_position_init_gives_mae_codes_to_the_vit_and_its_momentum_copy():
    from blipsearch.training.model import sincos_positions

    torch.testing.assert_close(sincos_positions(4, 32), torch.from_numpy(mae_sincos(4, 32)).float())
    model, _, _ = tiny(["model.vision_position_init=sincos"])  # 32 px / patch 8: a 4 x 4 grid, width 32
    codes = sincos_positions(4, 32)[None]
    torch.testing.assert_close(model.vision_model.embeddings.position_embedding.detach(), codes)
    torch.testing.assert_close(model.vision_model_m.embeddings.position_embedding, codes)
    assert model.vision_model.embeddings.position_embedding.requires_grad  # a start, learned afterwards
    # patches one column apart differ in the column codes only; [CLS] gets none
    assert torch.equal(codes[0, 0], torch.zeros(32))
    assert torch.equal(codes[0, 1, 16:], codes[0, 2, 16:]) and not torch.equal(codes[0, 1, :16], codes[0, 2, :16])
    random_start, _, _ = tiny()
    assert float(random_start.vision_model.embeddings.position_embedding.detach().std()) < 0.05


@pytest.mark.parametrize("overrides", [["model.vision_position_init=learned"],
                                       ["model.vision_position_init=sincos", "model.family=blip-2"],
                                       ["model.vision_position_init=sincos", "model.init_from=some/checkpoint"]])
def test_sincos_position_init_is_refused_where_no_vit_is_trained_from_scratch(overrides):
    from blipsearch.retrieval.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="vision_position_init"):
        load_config(None, overrides)


def test_the_word_level_vocabulary_holds_the_words_its_tokenizer_looks_up():
    """"café" and "一只猫" were kept as words while the tokenizer looks up "cafe" and one word per character:
    they read as [UNK], and no warning counted them."""
    from blipsearch.training.tokenizer import warn_unknown_words, word_tokenizer

    captions = ["A café in Zürich", "一只猫 on the mat.", "Straße über-cool"]
    tokenizer = word_tokenizer(captions)
    for caption in captions:
        assert tokenizer.unk_token not in tokenizer.tokenize(caption), tokenizer.tokenize(caption)
    assert tokenizer.tokenize("一只猫") == ["一", "只", "猫"] and warn_unknown_words(tokenizer, captions) == []
    assert warn_unknown_words(tokenizer, ["a dog in Zürich"]) == ["dog"]
