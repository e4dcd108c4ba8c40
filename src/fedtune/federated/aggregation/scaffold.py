"""SCAFFOLD's server step (Karimireddy et al., 2020, option II), pure numpy.

A client that started from ``x``, took ``K`` local steps at learning rate ``lr`` and returned
``y_i`` has the new control variate ``c_i+ = c_i - c + (x - y_i) / (K * lr)``. The server step:
``x += server_lr * sum_i p_i (y_i - x)`` and ``c += sum_i (c_i+ - c_i) / N``, with ``p_i`` the
clients' weights normalised and ``N`` the number of clients in the federation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]


def scaffold_step(
    x: Arrays,
    ys: Sequence[Arrays],
    weights: Sequence[float],
    c: Arrays,
    c_clients: Sequence[Arrays],
    steps: Sequence[int],
    lrs: Sequence[float],
    num_clients: int,
    server_lr: float = 1.0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """One SCAFFOLD server update: (new x, new c, new c_i of the participating clients).

    ``steps[i]`` and ``lrs[i]`` are what client ``i`` reports it trained with.
    """
    p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    new_x: dict[str, np.ndarray] = {}
    new_c: dict[str, np.ndarray] = {}
    new_ci: list[dict[str, np.ndarray]] = [{} for _ in ys]
    for key, x_k in x.items():
        step = sum(pk * (y[key].astype(np.float64) - x_k) for pk, y in zip(p, ys, strict=True))
        new_x[key] = (x_k + server_lr * step).astype(np.float32)
        dc = np.zeros_like(x_k, dtype=np.float64)
        for i, (y, ci, k, lr) in enumerate(zip(ys, c_clients, steps, lrs, strict=True)):
            updated = ci[key] - c[key] + (x_k - y[key].astype(np.float64)) / (k * lr)
            dc += updated - ci[key]
            new_ci[i][key] = updated.astype(np.float32)
        new_c[key] = (c[key] + dc / num_clients).astype(np.float32)
    return new_x, new_c, new_ci
