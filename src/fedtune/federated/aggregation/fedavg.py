"""Aggregation maths over adapter state dicts: pure functions, no Flower, no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedtune.errors import FedtuneError

Arrays = Mapping[str, np.ndarray]


def check_compatible(states: Sequence[Arrays]) -> None:
    """All states must have the same keys and shapes as the first one."""
    if not states:
        raise ValueError("nothing to aggregate")
    ref = states[0]
    for i, state in enumerate(states[1:], start=1):
        if set(state) != set(ref):
            diff = sorted(set(state) ^ set(ref))[:3]
            raise FedtuneError(f"update {i}: keys differ from update 0 (e.g. {diff})")
        for key, value in state.items():
            if value.shape != ref[key].shape:
                raise FedtuneError(
                    f"update {i}: {key} has shape {value.shape}, update 0 has {ref[key].shape}"
                )


def fedavg(states: Sequence[Arrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Weighted mean of state dicts: ``sum_k w_k x_k / sum_k w_k`` per key.

    Accumulates in float64 in the given order (callers sort clients, so the result
    does not depend on reply order) and returns float32.
    """
    check_compatible(states)
    if len(weights) != len(states):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    w = w / w.sum()
    out: dict[str, np.ndarray] = {}
    for key in states[0]:
        acc = np.zeros(states[0][key].shape, dtype=np.float64)
        for wk, state in zip(w, states, strict=True):
            acc += wk * state[key].astype(np.float64)
        out[key] = acc.astype(np.float32)
    return out


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """``sum(v * w) / sum(w)``; the weights must have a positive sum."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    return float(sum(v * w for v, w in zip(values, weights, strict=True)) / total)
