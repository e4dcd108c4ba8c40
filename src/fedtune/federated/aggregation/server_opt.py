"""Server optimisers on the pseudo-gradient (Reddi et al., 2021; Hsu et al., 2019), pure numpy.

With ``x`` the global adapter sent this round and ``a`` the clients' weighted mean, the
round's update is ``d = a - x``:

- ``avgm`` (FedAvgM): ``g = x - a``; with momentum ``beta``, ``m = beta * m + g`` (``m = g`` at
  first) and ``g = m``; then ``x <- x - eta * g``. With ``eta = 1`` and no momentum this is FedAvg;
- ``adam``: ``m = b1 m + (1 - b1) d``, ``v = b2 v + (1 - b2) d^2``,
  ``x <- x + eta_t m / (sqrt(v) + tau)`` with ``eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))``;
- ``yogi``: as adam but ``v = v - (1 - b2) d^2 sign(v - d^2)`` and no bias correction;
- ``adagrad``: ``m = d``, ``v = v + d^2``, ``x <- x + eta m / (sqrt(v) + tau)``.

These are Flower's Message-API formulas (``FedAvgM``, ``FedAdam``, ``FedYogi``, ``FedAdagrad``),
written out in the same float order so results match them (tests compare). The state
(``m``, ``v``, momentum) is fedtune's own, named by adapter key, so it is checkpointed with
every round and resumed exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Arrays = Mapping[str, np.ndarray]
Kind = Literal["avgm", "adam", "yogi", "adagrad"]

# Flower's defaults per optimiser: (eta, beta_1, beta_2, tau)
DEFAULTS: dict[str, tuple[float, float, float, float]] = {
    "avgm": (1.0, 0.0, 0.0, 0.0),
    "adam": (1e-1, 0.9, 0.99, 1e-3),
    "yogi": (1e-2, 0.9, 0.99, 1e-3),
    "adagrad": (1e-1, 0.0, 0.0, 1e-3),
}


@dataclass
class ServerOptimizer:
    """One server optimiser and its state; :meth:`step` maps (global, mean) to the new global."""

    kind: Kind
    eta: float
    beta_1: float = 0.0
    beta_2: float = 0.0
    tau: float = 0.0
    momentum: float = 0.0  # avgm only
    state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # "m_t", "v_t" or "momentum"

    def step(self, x: Arrays, mean: Arrays, server_round: int) -> dict[str, np.ndarray]:
        """The new global adapter (float32) from ``x`` and the clients' mean ``mean``."""
        if self.kind == "avgm":
            return self._avgm(x, mean)
        delta = {k: mean[k] - x[k] for k in mean}
        m = self.state.get("m_t") or {k: np.zeros_like(v) for k, v in delta.items()}
        b1 = 0.0 if self.kind == "adagrad" else self.beta_1
        m = {k: b1 * v + (1 - b1) * delta[k] for k, v in m.items()}
        v = self.state.get("v_t") or {k: np.zeros_like(d) for k, d in delta.items()}
        eta = self.eta
        if self.kind == "adam":
            v = {k: self.beta_2 * s + (1 - self.beta_2) * (delta[k] ** 2) for k, s in v.items()}
            eta = (
                self.eta
                * np.sqrt(1 - np.power(self.beta_2, server_round + 1.0))
                / (1 - np.power(self.beta_1, server_round + 1.0))
            )
        elif self.kind == "yogi":
            v = {
                k: s - (1.0 - self.beta_2) * (delta[k] ** 2) * np.sign(s - delta[k] ** 2)
                for k, s in v.items()
            }
        else:
            v = {k: s + (delta[k] ** 2) for k, s in v.items()}
        self.state = {"m_t": m, "v_t": v}
        return {k: (xk + eta * m[k] / (np.sqrt(v[k]) + self.tau)).astype(np.float32) for k, xk in x.items()}

    def _avgm(self, x: Arrays, mean: Arrays) -> dict[str, np.ndarray]:
        grad = {k: x[k] - mean[k] for k in x}
        if self.momentum > 0.0:
            held = self.state.get("momentum")
            grad = grad if held is None else {k: self.momentum * held[k] + g for k, g in grad.items()}
            self.state = {"momentum": grad}
        return {k: np.asarray(x[k] - self.eta * g).astype(np.float32) for k, g in grad.items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state as flat ``"<part>/<adapter key>"`` arrays, for a checkpoint."""
        return {
            f"{part}/{k}": np.asarray(v) for part, arrays in self.state.items() for k, v in arrays.items()
        }

    def load_state_dict(self, flat: Mapping[str, np.ndarray]) -> None:
        state: dict[str, dict[str, np.ndarray]] = {}
        for key, value in flat.items():
            part, _, name = key.partition("/")
            state.setdefault(part, {})[name] = value
        self.state = state
