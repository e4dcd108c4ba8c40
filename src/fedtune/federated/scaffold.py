"""SCAFFOLD (Karimireddy et al., 2020) for adapters, with control variates kept on the server.

Flower has no SCAFFOLD strategy, so this is fedtune's, on top of :class:`AdapterStrategy`.
With option II of the paper a client's new control variate is

    c_i+ = c_i - c + (x - y_i) / (K * lr)

where x is the global adapter it started from, y_i the adapter it returns, K its
local steps and lr its learning rate: all known to the server. So the server keeps
every ``c_i`` itself, sends each client only its correction ``c - c_i`` (added to the
gradients at every local step), and clients stay stateless (fit for Flower's
deployment runtime, where a client process lives for one message). The paper's
analysis assumes plain SGD on the clients: use ``train.optimizer = "sgd"``.

Server step: ``x += server_lr * Σ p_i (y_i - x)`` and ``c += Σ_i (c_i+ - c_i) / N``.
``c`` and every ``c_i`` are saved with each round's checkpoint, so resume is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MessageType

from fedtune.config import Config
from fedtune.federated.records import to_record
from fedtune.federated.strategies import AdapterStrategy, Arrays, _register
from fedtune.training.local import planned_steps
from fedtune.training.schedule import at_round


def scaffold_step(
    x: Arrays,
    ys: list[Arrays],
    weights: list[float],
    c: Arrays,
    c_clients: list[Arrays],
    steps: list[int],
    lr: float,
    num_clients: int,
    server_lr: float = 1.0,
) -> tuple[Arrays, Arrays, list[Arrays]]:
    """One SCAFFOLD server update: (new x, new c, new c_i of the participating clients)."""
    p = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    new_x, new_c, new_ci = {}, {}, [dict() for _ in ys]  # type: ignore[var-annotated]
    for key, x_k in x.items():
        step = sum(pk * (y[key].astype(np.float64) - x_k) for pk, y in zip(p, ys, strict=True))
        new_x[key] = (x_k + server_lr * step).astype(np.float32)
        dc = np.zeros_like(x_k, dtype=np.float64)
        for i, (y, ci, k) in enumerate(zip(ys, c_clients, steps, strict=True)):
            updated = ci[key] - c[key] + (x_k - y[key].astype(np.float64)) / (k * lr)
            dc += updated - ci[key]
            new_ci[i][key] = updated.astype(np.float32)
        new_c[key] = (c[key] + dc / num_clients).astype(np.float32)
    return new_x, new_c, new_ci


class ScaffoldStrategy(AdapterStrategy):
    """SCAFFOLD with server-side client control variates (see module docstring)."""

    def bind(self, cfg: Config, clients: dict[int, int]) -> ScaffoldStrategy:
        super().bind(cfg, clients)
        self.c: Arrays = {}
        self.c_clients: dict[int, Arrays] = {}
        return self

    def _ci(self, pid: int, like: Arrays) -> Arrays:
        return self.c_clients.get(pid) or {k: np.zeros_like(v) for k, v in like.items()}

    def client_payload(
        self, pid: int, global_state: Arrays, message_type: str, server_round: int
    ) -> tuple[dict[str, ArrayRecord], dict[str, Any], Arrays]:
        records, extra, reference = super().client_payload(pid, global_state, message_type, server_round)
        if message_type == MessageType.TRAIN and self.c:
            ci = self._ci(pid, self.c)
            correction = {k: self.c[k] - ci[k] for k in self.c}
            records = {**records, "correction": to_record(correction, "float32")}
        return records, extra, reference

    def aggregate_states(self, states: list[Arrays], weights: list[int], clients: list[int]) -> Arrays:
        x = self._global
        c = self.c or {k: np.zeros_like(v) for k, v in x.items()}
        steps = [planned_steps(self.cfg.train, n) for n in weights]
        new_x, self.c, new_ci = scaffold_step(
            x,
            states,
            [float(w) for w in weights],
            c,
            [self._ci(pid, x) for pid in clients],
            steps,
            at_round(self.cfg, self.current_round).train.lr,  # the lr the clients trained at
            self.cfg.partition.num_partitions,
            self.cfg.fed.server_lr or 1.0,
        )
        self.c_clients.update(zip(clients, new_ci, strict=True))
        return new_x

    def server_state(self) -> Arrays:
        out = {f"c/{k}": v for k, v in self.c.items()}
        for pid, ci in self.c_clients.items():
            out.update({f"ci/{pid}/{k}": v for k, v in ci.items()})
        return out

    def load_server_state(self, state: Arrays, current: Arrays) -> None:
        self.c = {k[2:]: v for k, v in state.items() if k.startswith("c/")}
        for key, value in state.items():
            if key.startswith("ci/"):
                _, pid, name = key.split("/", 2)
                self.c_clients.setdefault(int(pid), {})[name] = value


_register("scaffold", ScaffoldStrategy, lambda cfg: {})
