"""SCAFFOLD (Karimireddy et al., 2020) for adapters, with control variates kept on the server.

Flower has no SCAFFOLD strategy, so this is fedtune's. With option II of the paper a
client's new control variate follows from what the server already has: the adapter it
sent ``x``, the one it got back ``y_i``, and the steps ``K`` and learning rate ``lr`` the
client reports (:func:`~fedtune.federated.aggregation.scaffold.scaffold_step`). So the server
keeps every ``c_i``, sends each client only its correction ``c - c_i`` (added to the
gradients at every local step), and clients stay stateless (fit for Flower's deployment
runtime, where a client process lives for one message). The paper's analysis assumes
plain SGD on the clients: use ``train.optimizer = "sgd"``. ``c`` and every ``c_i`` are saved
with each round's checkpoint, so resume is exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flwr.app import MessageType

from fedtune.config import Config
from fedtune.federated.aggregation.scaffold import scaffold_step
from fedtune.federated.protocol import Instruction
from fedtune.federated.records import to_record
from fedtune.federated.strategies.base import AdapterStrategy, Arrays, Update


class ScaffoldStrategy(AdapterStrategy):
    """SCAFFOLD with server-side client control variates (see module docstring)."""

    def __init__(self, cfg: Config, clients: dict[int, int]) -> None:
        super().__init__(cfg, clients)
        self.c: Arrays = {}
        self.c_clients: dict[int, Arrays] = {}

    def _ci(self, pid: int, like: Arrays) -> Arrays:
        return self.c_clients.get(pid) or {k: np.zeros_like(v) for k, v in like.items()}

    def instruction(self, pid: int, global_state: Arrays, message_type: str) -> tuple[Instruction, Arrays]:
        inst, reference = super().instruction(pid, global_state, message_type)
        if message_type == MessageType.TRAIN and self.c:
            ci = self._ci(pid, self.c)
            correction = to_record({k: self.c[k] - ci[k] for k in self.c}, "float32")
            inst = dataclasses.replace(inst, correction=correction)
        return inst, reference

    def aggregate_updates(self, updates: list[Update]) -> Arrays:
        x = self._global
        new_x, self.c, new_ci = scaffold_step(
            x,
            [u.state for u in updates],
            [float(u.weight) for u in updates],
            self.c or {k: np.zeros_like(v) for k, v in x.items()},
            [self._ci(u.pid, x) for u in updates],
            [u.reply.steps for u in updates],  # what each client reports it did
            [u.reply.lr for u in updates],
            self.cfg.partition.num_partitions,
            self.cfg.fed.server_lr or 1.0,
        )
        self.c_clients.update(zip([u.pid for u in updates], new_ci, strict=True))
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
