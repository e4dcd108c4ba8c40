"""Reciprocal rank fusion: merge rankings by position only.

Scores from BM25 and from cosine similarity, or from two indexes built apart, are on
different scales; ranks are not. RRF gives an item ``sum over rankings of 1 / (k + rank)``
(rank counted from 1), the rule of Cormack, Clarke and Büttcher (SIGIR 2009).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

RRF_K = 60


def rrf(rankings: Sequence[Sequence[K]], *, k: int = RRF_K, top: int | None = None) -> list[tuple[K, float]]:
    """Fuse ``rankings`` (each best first) into one list of ``(item, score)``, best first.

    Ties keep the order in which items were first seen (earlier rankings first), so the
    result is deterministic. ``top`` keeps only the best ``top``.
    """
    if k <= 0:
        raise ValueError(f"rrf k must be positive, got {k}")
    scores: dict[K, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    order = sorted(scores.items(), key=lambda kv: -kv[1])  # stable: first-seen order on ties
    return order if top is None else order[:top]
