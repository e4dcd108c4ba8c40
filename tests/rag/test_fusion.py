"""Reciprocal rank fusion, with scores worked by hand."""

from __future__ import annotations

import pytest

from fedtune.rag.fusion import RRF_K, rrf


def test_scores_are_sums_of_reciprocal_ranks() -> None:
    # k=1: x = 1/(1+1); y = 1/(1+2) + 1/(1+1) = 5/6; z = 1/(1+2)
    fused = rrf([["x", "y"], ["y", "z"]], k=1)

    assert [item for item, _ in fused] == ["y", "x", "z"]
    assert [score for _, score in fused] == pytest.approx([5 / 6, 1 / 2, 1 / 3])


def test_default_k_is_sixty() -> None:
    # b: 1/61 + 1/62, c: 1/63 + 1/62, a: 1/61, d: 1/63
    fused = dict(rrf([["a", "b", "c"], ["b", "c", "d"]]))

    assert RRF_K == 60
    assert fused == pytest.approx({"b": 1 / 61 + 1 / 62, "c": 1 / 62 + 1 / 63, "a": 1 / 61, "d": 1 / 63})
    assert list(fused) == ["b", "c", "a", "d"]


def test_ties_keep_first_seen_order() -> None:
    # each item is first once and second once: all score 1/61 + 1/62
    assert [i for i, _ in rrf([["p", "q"], ["q", "p"]])] == ["p", "q"]
    assert [i for i, _ in rrf([["q", "p"], ["p", "q"]])] == ["q", "p"]


def test_one_ranking_keeps_its_order_and_top_cuts() -> None:
    fused = rrf([[3, 1, 2]], top=2)

    assert fused == [(3, pytest.approx(1 / 61)), (1, pytest.approx(1 / 62))]


def test_no_rankings_fuse_to_nothing() -> None:
    assert rrf([]) == []
    assert rrf([[], []]) == []


@pytest.mark.parametrize("k", [0, -1])
def test_k_must_be_positive(k: int) -> None:
    with pytest.raises(ValueError, match="rrf k must be positive"):
        rrf([["a"]], k=k)
