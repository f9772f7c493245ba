"""BLIP-2 stage 1 for training: the Q-Former, each loss against a plain reference, the frozen image encoder,
BERT and checkpoint initialisation, and the export that transformers and the engine load."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blipsearch.retrieval.errors import InvalidInputError
from blipsearch.training.config import load_config
from blipsearch.training.families import FAMILIES
from blipsearch.training.objectives import (
    Batch,
    Blip2Objective,
    Progress,
    max_query_similarity,
    query_itc_loss,
    smoothed_targets,
)
from blipsearch.training.tokenizer import word_tokenizer
from blipsearch.training.vision import image_tokens

CAPTIONS = ["a red circle left of a blue square", "a small green triangle", "a blue square above a red circle",
            "a red circle"]
IMAGE_IDS = [0, 1, 2, 0]  # captions 0 and 3 describe one image: positives of each other
QUERIES = 4


def tiny_blip2(overrides=(), captions=CAPTIONS):
    """(model, tokenizer, config): the tiny preset with 4 queries and no dropout; a random frozen ViT."""
    cfg = load_config(None, ["model.family=blip-2", "model.preset=tiny", f"model.num_query_tokens={QUERIES}",
                             "model.text_dropout=0.0", *overrides])
    tokenizer = word_tokenizer(captions)
    torch.manual_seed(0)
    return FAMILIES["blip-2"].build(cfg, tokenizer), tokenizer, cfg


def spread(model, std=0.3, seed=1):
    """Trained-like weights: at BERT's initialisation (std 0.02) every image gives nearly the same query
    vectors, which would hide mistakes. Noise on every trainable tensor (the frozen ViT keeps its own)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name != "temp":
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
    return model


def batch_of(tokenizer, captions=CAPTIONS, image_ids=IMAGE_IDS, seed=0):
    torch.manual_seed(seed)
    tokens = tokenizer(captions, padding="longest", return_tensors="pt")
    n = len(captions)
    return Batch(torch.randn(n, 3, 32, 32), tokens["input_ids"], tokens["attention_mask"], torch.tensor(image_ids),
                 torch.arange(n))


# --- a plain Q-Former: explicit attention maths and masks built by loops --------------------------

def _visibility(text_mask, queries: int, causal: bool) -> torch.Tensor:
    """(B, n, n) may row i attend key j: padding keys never; with `causal` (ITG), queries see only queries
    and text row i sees every query and the text up to i."""
    batch, length = text_mask.shape
    n = queries + length
    allowed = torch.zeros(batch, n, n, dtype=torch.bool)
    for b in range(batch):
        for i in range(n):
            for j in range(n):
                real_key = j < queries or bool(text_mask[b, j - queries])
                seen = j < queries or not causal or (i >= queries and j <= i)
                allowed[b, i, j] = real_key and seen
    return allowed


def _attend(block, x, context, allowed, heads):
    """BERT attention block: per head softmax(q k^T / sqrt(d)) v over the allowed keys; dense, residual, norm."""
    (b, n, width), m = x.shape, context.shape[1]
    d = width // heads
    q = block.attention.query(x).view(b, n, heads, d).transpose(1, 2)
    k = block.attention.key(context).view(b, m, heads, d).transpose(1, 2)
    v = block.attention.value(context).view(b, m, heads, d).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed[:, None], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, width)
    return block.output.LayerNorm(block.output.dense(out) + x)


def _ffn(intermediate, output, x):
    return output.LayerNorm(output.dense(F.gelu(intermediate.dense(x))) + x)


def reference_hidden(model, image=None, input_ids=None, text_mask=None, causal=False):
    """Last hidden states (B, Q + L, H); queries are present when an image is given."""
    queries = model.config.num_query_tokens if image is not None else 0
    batch = image.shape[0] if image is not None else input_ids.shape[0]
    parts = [model.query_tokens.expand(batch, -1, -1)] if queries else []
    if input_ids is not None:
        emb = model.embeddings
        parts.append(emb.word_embeddings.weight[input_ids] + emb.position_embeddings.weight[:input_ids.shape[1]])
        text_mask = text_mask if text_mask is not None else torch.ones_like(input_ids)
    else:
        text_mask = torch.ones(batch, 0, dtype=torch.long)
    h = model.qformer.layernorm(torch.cat(parts, dim=1))
    allowed = _visibility(text_mask, queries, causal)
    config = model.qformer.config
    for index, layer in enumerate(model.qformer.encoder.layer):
        h = _attend(layer.attention, h, h, allowed, config.num_attention_heads)
        q, t = h[:, :queries], h[:, queries:]
        if queries and index % config.cross_attention_frequency == 0:
            everything = torch.ones(batch, queries, image.shape[1], dtype=torch.bool)
            q = _attend(layer.crossattention, q, image, everything, config.num_attention_heads)
        q = _ffn(layer.intermediate_query, layer.output_query, q)  # queries and text: their own blocks
        h = torch.cat([q, _ffn(layer.intermediate, layer.output, t)], dim=1)
    return h


def reference_image_vectors(model, image):
    return F.normalize(model.vision_projection(reference_hidden(model, image)), dim=-1)  # (B, Q, D)


def reference_text_vectors(model, input_ids, mask):
    return F.normalize(model.text_projection(reference_hidden(model, None, input_ids, mask)[:, 0]), dim=-1)


def reference_itm(model, image, input_ids, mask):
    hidden = reference_hidden(model, image, input_ids, mask)[:, :model.config.num_query_tokens]
    return model.itm_head(hidden).mean(dim=1)  # (N, 2)


def reference_lm_logits(model, image, input_ids, mask):
    input_ids = input_ids.clone()
    input_ids[:, 0] = model.ids.bos
    hidden = reference_hidden(model, image, input_ids, mask, causal=True)[:, model.config.num_query_tokens:]
    head = model.lm_head.transform
    hidden = head.LayerNorm(F.gelu(head.dense(hidden)))
    return F.linear(hidden, model.embeddings.word_embeddings.weight, model.lm_head.decoder.bias)  # tied weights


@pytest.fixture(scope="module")
def double_model():
    """The tiny model in float64 with spread weights, its tokenizer, config and a batch."""
    model, tokenizer, cfg = tiny_blip2()
    model = spread(model).double()
    batch = batch_of(tokenizer)
    batch.pixel_values = batch.pixel_values.double()
    return model, tokenizer, cfg, batch


# --- the Q-Former -------------------------------------------------------------------------------

def test_qformer_layout_matches_blip2_retrieval_names_and_lavis_initialisation():
    from transformers import Blip2ForImageTextRetrieval

    model, tokenizer, _ = tiny_blip2(["model.text_layers=4", "model.cross_attention_frequency=2"])
    assert model.query_tokens.shape == (1, QUERIES, 32) and model.query_tokens.std().item() > 0.01
    layers = model.qformer.encoder.layer
    assert [layer.has_cross_attention for layer in layers] == [True, False, True, False]
    for layer in layers:  # the queries' feed-forward blocks start as copies of the text's, not shared
        torch.testing.assert_close(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
        torch.testing.assert_close(layer.output_query.LayerNorm.bias, layer.output.LayerNorm.bias)
        assert layer.intermediate_query.dense.weight.data_ptr() != layer.intermediate.dense.weight.data_ptr()
    assert model.ids.bos == tokenizer.convert_tokens_to_ids("[DEC]") == tokenizer.bos_token_id
    assert model.lm_head.decoder.weight is model.embeddings.word_embeddings.weight
    ours = {k for k in model.state_dict() if k != "temp" and not k.startswith("lm_head.")}
    assert ours == set(Blip2ForImageTextRetrieval(model.config).state_dict())  # export is a state-dict mapping
    assert model.temp.item() == pytest.approx(0.07)
    assert "lm_head" not in dict(tiny_blip2(["objective.losses={itc: 1.0, itm: 1.0}"])[0].named_children())


def test_the_four_passes_equal_a_plain_qformer(double_model):
    model, _, _, batch = double_model
    with torch.no_grad():
        image, vectors = model.encode_image(batch.pixel_values)
        torch.testing.assert_close(vectors, reference_image_vectors(model, image).float())
        torch.testing.assert_close(model.encode_text(batch.input_ids, batch.attention_mask),
                                   reference_text_vectors(model, batch.input_ids, batch.attention_mask).float())
        torch.testing.assert_close(model.itm_logits(batch.input_ids, batch.attention_mask, image),
                                   reference_itm(model, image, batch.input_ids, batch.attention_mask).float())
        logits = reference_lm_logits(model, image, batch.input_ids, batch.attention_mask).float()
        torch.testing.assert_close(model.lm_logits(batch.input_ids, batch.attention_mask, image), logits)
        assert float((vectors[0] - vectors[1]).abs().max()) > 0.05  # images differ: the check has teeth


def test_generation_never_lets_a_token_see_later_text(double_model):
    model, _, _, batch = double_model
    with torch.no_grad():
        image, _ = model.encode_image(batch.pixel_values)
        changed = batch.input_ids.clone()
        changed[:, 4:] = 7  # every token from position 4 on
        a = model.lm_logits(batch.input_ids, batch.attention_mask, image)
        b = model.lm_logits(changed, batch.attention_mask, image)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


# --- the losses ---------------------------------------------------------------------------------

def _leaf(*shape, seed=0):
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _reference_itc(image_vecs, text_vecs, ids, temp, eps):
    """Loops: score(i, j) = max over image i's queries of query . text j; targets uniform over the same id,
    smoothed by eps over all keys; cross-entropy per row, both directions averaged."""
    n, queries = image_vecs.shape[0], image_vecs.shape[1]

    def score(i, j):
        return torch.stack([image_vecs[i, q] @ text_vecs[j] for q in range(queries)]).max() / temp

    def row_loss(logits, i):
        positives = [j for j in range(n) if ids[j] == ids[i]]
        lse = torch.logsumexp(torch.stack(logits), dim=0)
        return -sum(((1 - eps) * (j in positives) / len(positives) + eps / n) * (logits[j] - lse) for j in range(n))

    i2t = sum(row_loss([score(i, j) for j in range(n)], i) for i in range(n)) / n
    t2i = sum(row_loss([score(j, i) for j in range(n)], i) for i in range(n)) / n
    return (i2t + t2i) / 2


def test_query_itc_loss_matches_reference_forward_and_gradient():
    image, text = F.normalize(_leaf(4, 3, 5, seed=1), dim=-1), F.normalize(_leaf(4, 5, seed=2), dim=-1)
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor(IMAGE_IDS)
    ours = query_itc_loss(image, text, image, text, smoothed_targets(ids, ids, 0.1), temp)
    ref = _reference_itc(image, text, ids.tolist(), temp, 0.1)
    torch.testing.assert_close(ours, ref)
    leaves = (image, text, temp)
    ours_grads = torch.autograd.grad(ours, leaves, retain_graph=True)
    for g, r in zip(ours_grads, torch.autograd.grad(ref, leaves), strict=True):
        torch.testing.assert_close(g, r)
    # without image ids (pairs): LAVIS's cross_entropy(label_smoothing=0.1) against the diagonal
    pairs = torch.arange(4)
    plain = query_itc_loss(image, text, image, text, smoothed_targets(pairs, pairs, 0.1), temp)
    sim = max_query_similarity(image, text) / temp
    lavis = (F.cross_entropy(sim, pairs, label_smoothing=0.1)
             + F.cross_entropy(sim.t(), pairs, label_smoothing=0.1)) / 2
    torch.testing.assert_close(plain, lavis)


def test_objective_itc_is_the_reference_on_the_models_features(double_model):
    model, _, _, batch = double_model
    losses = Blip2Objective(load_config(None, ["model.family=blip-2", "objective.losses={itc: 1.0}"]).objective)(
        model, batch, Progress(0, 0.0, 0))
    assert set(losses) == {"itc_loss"}
    with torch.no_grad():
        image, _ = model.encode_image(batch.pixel_values)
        ref = _reference_itc(reference_image_vectors(model, image), reference_text_vectors(
            model, batch.input_ids, batch.attention_mask), IMAGE_IDS, model.temp, 0.1)
    torch.testing.assert_close(losses["itc_loss"].double(), ref, rtol=1e-5, atol=1e-6)


def test_objective_itm_is_the_reference_with_the_same_hard_negatives(double_model):
    model, _, _, batch = double_model
    cfg = load_config(None, ["model.family=blip-2", "objective.losses={itm: 1.0}"])
    losses = Blip2Objective(cfg.objective)(model, batch, Progress(0, 0.0, seed=11))
    n, ids = len(IMAGE_IDS), IMAGE_IDS
    with torch.no_grad():
        image, _ = model.encode_image(batch.pixel_values)
        vecs = reference_image_vectors(model, image).float()
        texts = reference_text_vectors(model, batch.input_ids, batch.attention_mask).float()
        sim = torch.tensor([[max(float(vecs[i, q] @ texts[j]) for q in range(QUERIES)) for j in range(n)]
                            for i in range(n)]) / float(model.temp)  # image i, text j
        positive = torch.tensor([[ids[i] == ids[j] for j in range(n)] for i in range(n)])
        generator = torch.Generator().manual_seed(11)
        draws = []
        for scores in (sim, sim.t()):  # first a text for each image, then an image for each text
            weights = (scores.softmax(dim=1) + 1e-6).masked_fill(positive, 0.0)
            draws.append(torch.multinomial(weights, 1, generator=generator)[:, 0].tolist())
        neg_text, neg_image = draws
        pairs = ([(i, i, 1) for i in range(n)] + [(neg_image[t], t, 0) for t in range(n)]
                 + [(i, neg_text[i], 0) for i in range(n)])  # (image, text, label)
        assert all(ids[i] != ids[t] for i, t, label in pairs if label == 0)
        total = 0.0
        for i, t, label in pairs:
            logits = reference_itm(model, image[i:i + 1], batch.input_ids[t:t + 1], batch.attention_mask[t:t + 1])[0]
            total -= float(logits[label] - torch.logsumexp(logits, dim=0))
    assert losses["itm_loss"].item() == pytest.approx(total / len(pairs), rel=1e-5)


def test_objective_itg_is_the_reference_with_label_smoothing(double_model):
    model, _, _, batch = double_model
    cfg = load_config(None, ["model.family=blip-2", "objective.losses={itg: 1.0}"])
    losses = Blip2Objective(cfg.objective)(model, batch, Progress(0, 0.0, 0))
    eps, terms = 0.1, []
    with torch.no_grad():
        image, _ = model.encode_image(batch.pixel_values)
        logits = reference_lm_logits(model, image, batch.input_ids, batch.attention_mask)
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):  # position t predicts token t + 1, where that is not padding
            if batch.attention_mask[b, t + 1]:
                logp = F.log_softmax(logits[b, t], dim=0)
                terms.append((1 - eps) * -logp[batch.input_ids[b, t + 1]] + eps * -logp.mean())
    assert losses["itg_loss"].item() == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)


def test_losses_are_weighted_by_the_config():
    model, tokenizer, _ = tiny_blip2()
    batch = batch_of(tokenizer)
    plain = Blip2Objective(load_config(None, ["model.family=blip-2"]).objective)(model, batch, Progress(0, 0.0, 3))
    cfg = load_config(None, ["model.family=blip-2", "objective.losses={itc: 2.0, itm: 1.0, itg: 0.5}"])
    weighted = Blip2Objective(cfg.objective)(model, batch, Progress(0, 0.0, 3))
    assert set(plain) == {"itc_loss", "itm_loss", "itg_loss"}
    torch.testing.assert_close(weighted["itc_loss"], 2.0 * plain["itc_loss"])
    torch.testing.assert_close(weighted["itg_loss"], 0.5 * plain["itg_loss"])


# --- the frozen image encoder -------------------------------------------------------------------

def _one_step(model, cfg, tokenizer):
    from blipsearch.training.loop import param_groups

    optimizer = torch.optim.AdamW(param_groups(model.train(), 0.05), lr=1e-2)
    losses = Blip2Objective(cfg.objective)(model, batch_of(tokenizer), Progress(0, 0.0, 0))
    sum(losses.values()).backward()
    optimizer.step()


def test_frozen_image_encoder_gets_no_gradient_and_runs_without_autograd(tiny_model_dir):
    model, tokenizer, cfg = tiny_blip2([f"model.vision_from={tiny_model_dir}"])
    before = {n: p.detach().clone() for n, p in model.vision_model.named_parameters()}
    queries = model.query_tokens.detach().clone()
    grad_enabled = []
    for module in (model.vision_model.embeddings, model.vision_model.encoder, model.vision_model.post_layernorm):
        module.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    _one_step(model, cfg, tokenizer)
    assert grad_enabled and not any(grad_enabled)  # ITM and ITG reuse the one ViT pass
    assert len(grad_enabled) == 3 and not model.vision_model.training and model.qformer.training
    for name, p in model.vision_model.named_parameters():
        assert p.grad is None and not p.requires_grad, name
        assert torch.equal(p, before[name]), name
    assert not torch.equal(model.query_tokens, queries)


def test_train_vision_norm_trains_only_the_final_layernorm():
    model, tokenizer, cfg = tiny_blip2(["model.train_vision_norm=true"])
    _one_step(model, cfg, tokenizer)
    with_grad = {n for n, p in model.vision_model.named_parameters() if p.grad is not None}
    assert with_grad == {"post_layernorm.weight", "post_layernorm.bias"}


@pytest.mark.parametrize("source", ["blip", "blip-2"])
def test_image_encoder_is_the_checkpoints_vit(source, request):
    import transformers

    directory = request.getfixturevalue({"blip": "tiny_model_dir", "blip-2": "tiny_blip2_dir"}[source])
    model, _, _ = tiny_blip2([f"model.vision_from={directory}"])
    hf_class = {"blip": transformers.BlipForImageTextRetrieval, "blip-2": transformers.Blip2ForImageTextRetrieval}
    vit = hf_class[source].from_pretrained(directory).vision_model.eval()  # BLIP's own ViT class for BLIP
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(image_tokens(model.vision_model, pixels), vit(pixel_values=pixels).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


# --- initialisation -----------------------------------------------------------------------------

def test_qformer_starts_from_bert_with_random_cross_attention(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    vocab = len(word_tokenizer(CAPTIONS)) - 2  # BERT's vocabulary lacks [DEC] and [ENC]
    torch.manual_seed(5)
    bert = BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert")
    random, _, _ = tiny_blip2()
    model, _, _ = tiny_blip2([f"model.qformer_from={tmp_path / 'bert'}"])
    words = model.embeddings.word_embeddings.weight
    torch.testing.assert_close(words[:vocab], bert.bert.embeddings.word_embeddings.weight)
    torch.testing.assert_close(words[vocab:], random.embeddings.word_embeddings.weight[vocab:])  # [DEC], [ENC]
    torch.testing.assert_close(model.qformer.layernorm.weight, bert.bert.embeddings.LayerNorm.weight)
    for ours, theirs in zip(model.qformer.encoder.layer, bert.bert.encoder.layer, strict=True):
        torch.testing.assert_close(ours.attention.attention.key.weight, theirs.attention.self.key.weight)
        torch.testing.assert_close(ours.attention.output.LayerNorm.bias, theirs.attention.output.LayerNorm.bias)
        for block in (ours.intermediate, ours.intermediate_query):
            torch.testing.assert_close(block.dense.weight, theirs.intermediate.dense.weight)
        torch.testing.assert_close(ours.output_query.dense.bias, theirs.output.dense.bias)
    cross = model.qformer.encoder.layer[0].crossattention.attention.query.weight
    torch.testing.assert_close(cross, random.qformer.encoder.layer[0].crossattention.attention.query.weight)
    torch.testing.assert_close(model.lm_head.transform.dense.weight, bert.cls.predictions.transform.dense.weight)
    torch.testing.assert_close(model.lm_head.decoder.bias[:vocab], bert.cls.predictions.bias)


def test_qformer_starts_from_a_blip_text_encoder_with_its_cross_attention(tiny_model_dir):
    """A BLIP checkpoint as qformer_from: the text-only pass is BLIP's unimodal text encoder and projection
    (the same ITC text vectors, words matched by token though the two vocabularies number them apart)."""
    import transformers

    from blipsearch.training.tokenizer import load_tokenizer

    blip = transformers.BlipForImageTextRetrieval.from_pretrained(tiny_model_dir).eval()
    theirs = load_tokenizer(str(tiny_model_dir))
    captions = [*CAPTIONS, "a purple cube"]  # words the BLIP vocabulary lacks keep random rows
    start = [f"model.vision_from={tiny_model_dir}"]
    random, _, _ = tiny_blip2(start, captions=captions)
    model, ours, _ = tiny_blip2([*start, f"model.qformer_from={tiny_model_dir}"], captions=captions)
    model.eval()
    assert ours.convert_tokens_to_ids("circle") != theirs.convert_tokens_to_ids("circle")
    text, ref = (tok(CAPTIONS, padding="longest", return_tensors="pt") for tok in (ours, theirs))
    with torch.no_grad():
        got = model.encode_text(text["input_ids"], text["attention_mask"])
        hidden = blip.text_encoder(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
    torch.testing.assert_close(got, F.normalize(blip.text_proj(hidden[:, 0]), dim=-1), atol=1e-5, rtol=1e-5)
    words = model.embeddings.word_embeddings.weight
    for token in ("purple", "cube"):
        i = ours.convert_tokens_to_ids(token)
        torch.testing.assert_close(words[i], random.embeddings.word_embeddings.weight[i])
    their_words = blip.text_encoder.embeddings.word_embeddings.weight
    for token in ("[DEC]", "square"):
        torch.testing.assert_close(words[ours.convert_tokens_to_ids(token)],
                                   their_words[theirs.convert_tokens_to_ids(token)])
    ours_layer, their_layer = model.qformer.encoder.layer[0], blip.text_encoder.encoder.layer[0]
    torch.testing.assert_close(ours_layer.crossattention.attention.key.weight,
                               their_layer.crossattention.self.key.weight)
    torch.testing.assert_close(ours_layer.crossattention.output.dense.bias,
                               their_layer.crossattention.output.dense.bias)
    torch.testing.assert_close(ours_layer.intermediate_query.dense.weight, their_layer.intermediate.dense.weight)
    torch.testing.assert_close(model.itm_head.weight, random.itm_head.weight)  # BLIP's reads [ENC]: not taken


def test_qformer_from_refuses_checkpoints_without_a_text_encoder_to_start_from(tiny_blip2_dir, tmp_path):
    from blipsearch.retrieval.errors import ModelLoadError

    from tiny import save_tiny_blip

    captioner = save_tiny_blip(tmp_path / "captioner", model_class="BlipForConditionalGeneration")
    with pytest.raises(ModelLoadError, match="not a BLIP retrieval checkpoint"):
        tiny_blip2([f"model.qformer_from={captioner}"])  # its text encoder would load as random weights
    with pytest.raises(ModelLoadError, match="blip-2 checkpoint"):
        tiny_blip2([f"model.qformer_from={tiny_blip2_dir}"])
    wider = Path(__file__).resolve().parents[1] / "training" / "demo_model"  # 192 wide: a traceback (word rows)
    with pytest.raises(ModelLoadError, match=r"has no tensor of this Q-Former's shapes \(it is 32 wide\)"):
        tiny_blip2([f"model.qformer_from={wider}"])


def test_init_from_a_blip2_retrieval_checkpoint(tiny_blip2_dir, tmp_path):
    from safetensors.torch import load_file

    from blipsearch.training.loop import prepare_model

    cfg = load_config(None, ["model.family=blip-2", f"model.init_from={tiny_blip2_dir}"])
    model, tokenizer = prepare_model(cfg, [], tmp_path, is_main=False)
    weights = load_file(tiny_blip2_dir / "model.safetensors")
    for key in ("query_tokens", "qformer.encoder.layer.0.crossattention.attention.key.weight", "itm_head.weight",
                "qformer.encoder.layer.1.output_query.dense.weight",
                "vision_model.encoder.layers.0.self_attn.qkv.bias"):
        torch.testing.assert_close(model.state_dict()[key], weights[key])
    assert model.config.num_query_tokens == 8 and model.ids.bos == tokenizer.convert_tokens_to_ids("[DEC]")
    assert not any(p.requires_grad for p in model.vision_model.parameters())


def test_blip2_config_defaults_and_refusals():
    assert load_config(None, ["model.family=blip-2"]).objective.losses == {"itc": 1.0, "itm": 1.0, "itg": 1.0}
    assert load_config(None).objective.losses == {"itc": 1.0, "itm": 1.0, "lm": 1.0}  # BLIP's, unchanged
    with pytest.raises(InvalidInputError, match="itc, itm, itg"):
        load_config(None, ["model.family=blip-2", "objective.losses={lm: 1.0}"])
    with pytest.raises(InvalidInputError, match=r"model\.family"):
        load_config(None, ["model.family=blip-3"])
    with pytest.raises(InvalidInputError, match="blip-2"):
        load_config(None, ["model.vision_from=somewhere"])
    with pytest.raises(InvalidInputError, match="init_from"):
        load_config(None, ["model.family=blip-2", "model.init_from=a", "model.vision_from=b"])


# --- export -------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["blip", "blip-2"])
def test_export_equals_transformers_and_the_engine(source, request, tmp_path):
    """The export holds the training model's ViT (a BLIP one too, described as Blip2VisionConfig) and Q-Former:
    transformers' forward and the engine give the training model's ITC and ITM scores."""
    import numpy as np
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    from blipsearch.retrieval.models import load_model
    from blipsearch.training.data import normalise
    from blipsearch.training.export import export_blip2_retrieval

    directory = request.getfixturevalue({"blip": "tiny_model_dir", "blip-2": "tiny_blip2_dir"}[source])
    model, tokenizer, _ = tiny_blip2([f"model.vision_from={directory}"])
    model = spread(model).eval()
    out = export_blip2_retrieval(model, tokenizer, tmp_path / "export")
    hf = Blip2ForImageTextRetrieval.from_pretrained(out).eval()
    assert Blip2Processor.from_pretrained(out).tokenizer.convert_tokens_to_ids("[DEC]") == model.ids.bos
    pixels_u8 = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    pixels = normalise(torch.from_numpy(pixels_u8))
    tokens = tokenizer(CAPTIONS[:3], padding="longest", return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    with torch.no_grad():
        image, vectors = model.encode_image(pixels)
        itc = max_query_similarity(vectors, model.encode_text(ids, mask))  # (images, texts)
        itm = model.itm_logits(ids, mask, image)  # pairs
        torch.testing.assert_close(hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image, itc,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                      use_image_text_matching_head=True).logits_per_image, itm, atol=1e-5, rtol=1e-5)
    engine = load_model(str(out), device="cpu", precision="fp32")
    assert (engine.info.family, engine.info.vectors_per_image, engine.info.embed_dim) == ("blip-2", QUERIES, 16)
    encoded = engine.encode_images(engine.pixel_values(list(pixels_u8)))
    texts = engine.encode_texts(CAPTIONS[:3])
    torch.testing.assert_close(texts.tokens.input_ids, ids)
    torch.testing.assert_close(torch.einsum("iqd,td->itq", encoded.embeddings, texts.embeddings).amax(-1), itc,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine.itm_scores(texts.tokens, encoded.features), itm, atol=1e-5, rtol=1e-5)
