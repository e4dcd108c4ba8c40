"""Robust rules: hand-worked values, and the same numbers as Flower's legacy functions."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.federated.aggregation.robust import krum, median, trimmed_mean


def _states(values: list[float]) -> list[dict[str, np.ndarray]]:
    return [{"w": np.full((2,), v, dtype=np.float32)} for v in values]


def test_median_and_trimmed_mean_by_hand() -> None:
    states = _states([1.0, 2.0, 10.0, 3.0, -50.0])
    assert median(states)["w"].tolist() == [2.0, 2.0]
    # n = 5, cut 0.2: one value off each side (-50 and 10), mean of 1, 2, 3
    assert trimmed_mean(states, 0.2)["w"].tolist() == [2.0, 2.0]
    assert trimmed_mean(states, 0.0)["w"].tolist() == pytest.approx([-6.8, -6.8])  # plain mean
    with pytest.raises(ValueError, match="share cut"):
        trimmed_mean(states, 0.5)


def test_krum_picks_the_update_closest_to_its_neighbours() -> None:
    states = _states([1.0, 1.1, 0.9, 100.0])
    # f = 1: each scores its n - f - 2 = 1 nearest neighbour; 1.0 is 0.1 from both others
    assert krum(states, num_malicious=1)["w"].tolist() == pytest.approx([1.0, 1.0])


def test_same_numbers_as_flowers_legacy_functions() -> None:
    from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

    rng = np.random.default_rng(0)
    states = [{"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
              for _ in range(7)]  # fmt: skip
    results = [([s["a"], s["b"]], 1) for s in states]
    for ours, theirs in (
        (median(states), aggregate_median(results)),
        (trimmed_mean(states, 0.2), aggregate_trimmed_avg(results, 0.2)),
        (krum(states, 2), aggregate_krum(results, num_malicious=2, to_keep=0)),
    ):
        assert np.array_equal(ours["a"], np.asarray(theirs[0], np.float32))
        assert np.array_equal(ours["b"], np.asarray(theirs[1], np.float32))
