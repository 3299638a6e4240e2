"""Hybrid search's fusion of the vector and keyword rankings (services/search/store.py)."""

from __future__ import annotations

from morag.services.search.store import KEYWORD_WEIGHT, fuse


def test_equal_weights_are_plain_reciprocal_rank_fusion() -> None:
    scores = fuse([[1, 2], [2, 3]])
    assert scores[2] == 1 / 62 + 1 / 61 and scores[1] == 1 / 61 and scores[3] == 1 / 62


def test_a_keyword_only_hit_does_not_push_out_the_vector_top_ten() -> None:
    vector = list(range(100, 110))  # ten vector hits
    keyword = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # ten others, found by words alone
    scores = fuse([vector, keyword], weights=(1.0, KEYWORD_WEIGHT))
    top = sorted(scores, key=lambda item: -scores[item])[:10]
    assert top == vector
    # Without the weight, the keyword ranking's first hits would take places 2, 4, ...
    plain = fuse([vector, keyword])
    assert sorted(plain, key=lambda item: -plain[item])[:10] != vector


def test_agreement_lifts_a_hit_above_either_ranking_alone() -> None:
    scores = fuse([[1, 2, 3], [3, 4]], weights=(1.0, KEYWORD_WEIGHT))
    assert max(scores, key=scores.__getitem__) == 3
