"""Hybrid search's fusion of the vector and keyword rankings (services/search/store.py)."""

from __future__ import annotations

from morag.services.search.store import KEYWORD_WEIGHT, RRF_K, fuse


def test_equal_weights_are_plain_reciprocal_rank_fusion() -> None:
    scores = fuse([[1, 2], [2, 3]])
    first, second = 1 / (RRF_K + 1), 1 / (RRF_K + 2)
    assert scores[2] == second + first and scores[1] == first and scores[3] == second


def test_keyword_only_hits_stay_below_the_vector_rankings_first_places() -> None:
    vector = list(range(100, 110))  # ten vector hits
    keyword = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # ten others, found by words alone
    scores = fuse([vector, keyword], weights=(1.0, KEYWORD_WEIGHT))
    top = sorted(scores, key=lambda item: (-scores[item], item))[:10]
    assert top[:6] == vector[:6]
    assert top[6:8] == [1, 106]  # the keyword ranking's first ties the vector's seventh
    # Without the weight, the keyword ranking's first hit would share first place
    plain = fuse([vector, keyword])
    assert plain[1] == plain[100]


def test_agreement_lifts_a_hit_above_either_ranking_alone() -> None:
    scores = fuse([[1, 2, 3], [3, 4]], weights=(1.0, KEYWORD_WEIGHT))
    assert max(scores, key=scores.__getitem__) == 3
