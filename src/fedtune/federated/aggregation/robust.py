"""Byzantine-robust aggregation rules over adapter state dicts (pure numpy).

They follow the formulas of Flower's legacy ``flwr.server.strategy.aggregate`` functions
(``aggregate_median``, ``aggregate_trimmed_avg``, ``aggregate_krum``) and give the same
numbers (tests compare them); fedtune keeps its own copy so that no strategy depends on a
legacy Flower module. Weights are ignored: a robust rule must not let one client's claimed
example count move the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedtune.federated.aggregation.fedavg import check_compatible

Arrays = Mapping[str, np.ndarray]


def median(states: Sequence[Arrays]) -> dict[str, np.ndarray]:
    """Coordinate-wise median: ``out[k] = median_i states[i][k]`` element by element."""
    check_compatible(states)
    return {k: np.median(np.asarray([s[k] for s in states]), axis=0).astype(np.float32) for k in states[0]}


def trimmed_mean(states: Sequence[Arrays], cut: float) -> dict[str, np.ndarray]:
    """Coordinate-wise mean after dropping the ``floor(cut * n)`` smallest and largest values.

    ``cut`` is the share cut from each side, ``0 <= cut < 0.5`` (scipy's ``trim_mean``).
    """
    if not 0.0 <= cut < 0.5:
        raise ValueError(f"trimmed mean: the share cut per side must be in [0, 0.5), got {cut}")
    check_compatible(states)
    n = len(states)
    low = int(cut * n)
    high = n - low
    out = {}
    for key in states[0]:
        stacked = np.partition(np.asarray([s[key] for s in states]), (low, high - 1), axis=0)
        out[key] = np.mean(stacked[low:high], axis=0).astype(np.float32)
    return out


def squared_distances(states: Sequence[Arrays]) -> np.ndarray:
    """``d[i, j] = ||x_i - x_j||^2`` over all coordinates of all keys (keys in the first state's order)."""
    flat = np.array([np.concatenate([np.ravel(s[k]) for k in states[0]]) for s in states])
    d = np.zeros((len(states), len(states)))
    for i, x_i in enumerate(flat):
        for j, x_j in enumerate(flat):
            d[i, j] = np.linalg.norm(x_i - x_j) ** 2
    return d


def krum(states: Sequence[Arrays], num_malicious: int) -> dict[str, np.ndarray]:
    """Krum (Blanchard et al., 2017): the update whose ``n - f - 2`` nearest neighbours are closest.

    Score ``s_i = sum of d(i, j)`` over the ``max(1, n - f - 2)`` nearest ``j != i``; the state
    with the smallest score is returned as it is.
    """
    check_compatible(states)
    d = squared_distances(states)
    closest = max(1, len(states) - num_malicious - 2)
    scores = [np.sum(d[i, np.argsort(row)[1 : closest + 1]]) for i, row in enumerate(d)]
    best = states[int(np.argmin(scores))]
    return {k: np.asarray(best[k], dtype=np.float32) for k in best}
