"""Each BLIP loss against a plain reference implementation: forward values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from blipsearch.retrieval.errors import InvalidInputError
from blipsearch.training.objectives import (
    distillation_targets,
    itc_loss,
    itm_loss,
    lm_loss,
    positive_targets,
    sample_hard_negatives,
)


def _leaf(*shape, seed=0):
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _reference_soft_ce(queries, keys, targets, temp):
    """Row by row: -sum_j t_ij * (s_ij - logsumexp_k s_ik), averaged over rows."""
    total = 0.0
    for i in range(queries.shape[0]):
        logits = [sum(queries[i, d] * keys[j, d] for d in range(queries.shape[1])) / temp
                  for j in range(keys.shape[0])]
        lse = torch.logsumexp(torch.stack(logits), dim=0)
        total = total - sum(targets[i, j] * (logits[j] - lse) for j in range(keys.shape[0]))
    return total / queries.shape[0]


def test_itc_loss_matches_reference_forward_and_gradient():
    image, text = _leaf(3, 4, seed=1), _leaf(3, 4, seed=2)
    image_keys, text_keys = _leaf(5, 4, seed=3), _leaf(5, 4, seed=4)
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    ids, key_ids = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1, 2, 0])
    truth = positive_targets(ids, key_ids).double()
    t_i2t = distillation_targets(torch.randn(3, 5, dtype=torch.float64), truth, 0.4)
    t_t2i = distillation_targets(torch.randn(3, 5, dtype=torch.float64), truth, 0.4)

    ours = itc_loss(image, text, image_keys, text_keys, t_i2t, t_t2i, temp)
    grads = torch.autograd.grad(ours, (image, text, temp))
    ref = (_reference_soft_ce(image, text_keys, t_i2t, temp) + _reference_soft_ce(text, image_keys, t_t2i, temp)) / 2
    ref_grads = torch.autograd.grad(ref, (image, text, temp))
    torch.testing.assert_close(ours, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_positive_and_distillation_targets():
    truth = positive_targets(torch.tensor([7, 8]), torch.tensor([7, 8, 7, -100]))
    torch.testing.assert_close(truth, torch.tensor([[0.5, 0, 0.5, 0], [0, 1.0, 0, 0]]))
    sim_m = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    mixed = distillation_targets(sim_m, truth, alpha=0.4)
    torch.testing.assert_close(mixed, 0.4 * sim_m.softmax(1) + 0.6 * truth)
    torch.testing.assert_close(mixed.sum(1), torch.ones(2))


def test_itm_loss_matches_reference():
    logits, labels = _leaf(6, 2), torch.tensor([1, 1, 0, 0, 0, 0])
    ours = itm_loss(logits, labels)
    ref = -sum(logits[i, labels[i]] - torch.logsumexp(logits[i], 0) for i in range(6)) / 6
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])


def _reference_lm(logits, labels, eps):
    """Label smoothing spreads eps uniformly over the vocabulary: (1-eps) NLL + eps * mean_k(-log p_k)."""
    terms = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            logp = F.log_softmax(logits[b, t], dim=0)
            terms.append((1 - eps) * -logp[target] + eps * -logp.mean())
    return torch.stack(terms).mean()


def test_lm_loss_matches_reference_and_transformers():
    from transformers import BlipTextConfig, BlipTextLMHeadModel

    logits = _leaf(2, 5, 7)
    labels = torch.tensor([[2, 4, 5, 3, -100], [2, 6, 3, -100, -100]])
    ours = lm_loss(logits, labels, smoothing=0.1)
    ref = _reference_lm(logits, labels, 0.1)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])
    # transformers' own decoder loss (shift, label smoothing, token mean) agrees on its logits
    torch.manual_seed(0)
    config = BlipTextConfig(vocab_size=7, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8, label_smoothing=0.1, bos_token_id=1, sep_token_id=3)
    out = BlipTextLMHeadModel(config)(input_ids=labels.clamp(min=0), labels=labels)
    torch.testing.assert_close(lm_loss(out.logits, labels, smoothing=0.1), out.loss)


def test_lm_loss_token_count_divides_the_sum():
    logits, labels = _leaf(2, 4, 5), torch.tensor([[1, 2, 3, 4], [1, 2, -100, -100]])
    torch.testing.assert_close(lm_loss(logits, labels, 0.1, token_count=8.0),
                               lm_loss(logits, labels, 0.1) * 4 / 8)


def test_hard_negatives_never_pick_positives():
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    positives = ids[:, None] == ids[None, :]
    for trial in range(200):
        sim = torch.randn(8, 8) * 10
        sim[positives] += 50  # positives are by far the most similar: the sampler must still skip them
        negatives = sample_hard_negatives(sim, positives, generator)
        assert not positives[torch.arange(8), negatives].any(), trial


def test_hard_negatives_prefer_similar_ones():
    generator = torch.Generator().manual_seed(0)
    sim = torch.tensor([[0.0, 5.0, 0.0, 0.0]]).repeat(4, 1)
    positives = torch.eye(4, dtype=torch.bool)
    draws = torch.stack([sample_hard_negatives(sim, positives, generator) for _ in range(300)])
    share = (draws[:, 0] == 1).float().mean()  # row 0: softmax puts e^5 / (e^5 + 2) on column 1
    assert abs(share - math.exp(5) / (math.exp(5) + 2)) < 0.05


def test_hard_negatives_refuse_a_batch_without_negatives():
    with pytest.raises(InvalidInputError, match="no negative"):  # the CLI's one line (a ValueError: a traceback)
        sample_hard_negatives(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), torch.Generator())
