"""Recall@k from given score matrices, against ranks worked out by hand."""

import pytest
import torch

from blipsearch.retrieval.eval_metrics import Recall, ranks, recall, recall_at
from blipsearch.retrieval.evaluation import candidate_scores, reranked_ranks, top_candidates

# Two images with five captions each: captions 0-4 describe image 0, captions 5-9 image 1.
IMAGE_OF = torch.tensor([0] * 5 + [1] * 5)
IMAGES = torch.arange(2)


def test_image_to_text_counts_the_best_of_five_captions():
    scores = torch.tensor([
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 0.8, 0.7, 0.6, 0.05],  # best own caption 0.5; 4 wrong ones above
        [0.9, 0.1, 0.1, 0.1, 0.1, 0.95, 0.0, 0.0, 0.0, 0.0],  # own caption 5 first
    ])
    assert ranks(scores, IMAGES, IMAGE_OF).tolist() == [4, 0]
    i2t = ranks(scores, IMAGES, IMAGE_OF)
    assert [recall_at(i2t, k) for k in (1, 4, 5, 10)] == [50.0, 50.0, 100.0, 100.0]


def test_text_to_image_rank_is_the_own_image_position():
    scores = torch.tensor([[0.9, 0.1]] * 5 + [[0.3, 0.2]] * 4 + [[0.2, 0.3]])  # (10 captions, 2 images)
    assert ranks(scores, IMAGE_OF, IMAGES).tolist() == [0] * 5 + [1] * 4 + [0]


def test_a_tie_with_a_wrong_item_counts_against_the_query_in_either_order():
    wrong_first = torch.tensor([[0.5, 0.5, 0.1]])  # items: wrong, own, wrong
    own_first = torch.tensor([[0.5, 0.5, 0.1]])
    assert ranks(wrong_first, torch.tensor([1]), torch.tensor([0, 1, 2])).item() == 1
    assert ranks(own_first, torch.tensor([0]), torch.tensor([0, 1, 2])).item() == 1
    # Ties among the query's own captions do not matter; constant scores give recall@1 of 0.
    assert ranks(torch.ones(1, 4), torch.tensor([0]), torch.tensor([0, 0, 1, 1])).item() == 2


def test_k_larger_than_the_pool_counts_every_query():
    scores = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.2, 0.1, 0.3]])
    query_ranks = ranks(scores, torch.arange(3), torch.arange(3))
    assert query_ranks.tolist() == [2, 1, 0]
    assert recall_at(query_ranks, 1) == pytest.approx(100 / 3)
    assert recall_at(query_ranks, 5) == recall_at(query_ranks, 10) == 100.0


def test_candidates_rank_above_non_candidates_whatever_their_score():
    # Fused scores far below LAVIS's -100 filler (and -inf) still beat every non-candidate.
    itc = torch.tensor([[0.9, 0.2, 0.8, 0.1]])
    candidates = torch.tensor([[2, 1]])
    scores, tier = candidate_scores(itc, candidates, torch.tensor([[-500.0, float("-inf")]]))
    assert torch.equal(scores, torch.tensor([[0.9, float("-inf"), -500.0, 0.1]]))
    assert tier.tolist() == [[0, 1, 1, 0]]
    own = lambda item: reranked_ranks(itc, candidates, torch.tensor([[-500.0, float("-inf")]]),  # noqa: E731
                                      torch.tensor([item]), torch.arange(4))
    assert own(2).item() == 0  # best candidate
    assert own(1).item() == 1  # a candidate even at -inf beats item 0 (ITC 0.9, not a candidate)
    assert own(0).item() == 2  # non-candidates follow, in ITC order
    assert own(3).item() == 3


def test_non_finite_scores_rank_last():
    scores = torch.tensor([[float("nan"), 0.1, -1.0]])
    assert ranks(scores, torch.tensor([0]), torch.arange(3)).item() == 2


def test_images_without_captions_are_left_out_of_image_to_text_recall():
    i2t = torch.tensor([0, 7, 0])
    result = recall(i2t, torch.tensor([0, 0, 3, 20]), i2t_valid=torch.tensor([True, False, True]))
    assert result == Recall(100.0, 100.0, 100.0, 50.0, 75.0, 75.0)
    assert result.txt_r_mean == 100.0 and result.img_r_mean == pytest.approx(200 / 3)
    assert result.r_mean == pytest.approx((100.0 + 200 / 3) / 2)
    assert set(result.to_dict()) == {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5",
                                     "img_r10", "img_r_mean", "r_mean"}


def test_ranks_in_chunks_equal_ranks_at_once(monkeypatch):
    import blipsearch.retrieval.eval_metrics as metrics

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 30, generator=generator)
    image_of, queries = torch.arange(30) // 5, torch.arange(7) % 6

    def all_three():
        candidates = top_candidates(scores, 4)
        fused = torch.randn(7, 4, generator=torch.Generator().manual_seed(1)) - 200
        return (ranks(scores, queries, image_of), candidates,
                reranked_ranks(scores, candidates, fused, queries, image_of))

    expected = all_three()
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 40)  # one row at a time
    for ours, reference in zip(all_three(), expected, strict=True):
        assert torch.equal(ours, reference)


def test_top_candidates_keep_the_lower_index_on_ties_and_cap_k_at_the_pool():
    sim = torch.tensor([[0.5, 0.9, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]])
    assert top_candidates(sim, 2).tolist() == [[1, 0], [0, 1]]
    assert top_candidates(sim, 10).tolist() == [[1, 0, 2, 3], [0, 1, 2, 3]]
