"""The server's side of a split run: trunk replicas behind gRPC, one per client group.

The ServerApp starts a :class:`TrunkHost` next to Flower's round loop. Flower decides which
clients train and aggregates their head + tail adapters; within a round each client streams its
activations straight to its group's trunk service (never through the SuperLink). Modes
(``split.mode``):

- ``sequential``: one trunk; clients' steps take turns on it;
- ``client-batch``: one trunk that runs the concurrent clients' steps as one batch
  (:class:`~fedtune.split.batching.BatchingTrunkService`);
- ``hierarchical``: ``split.groups`` trunk replicas, client ``partition_id % groups`` on replica
  ``g``, steps in turn within a group and in parallel across groups; after each round the
  replicas' trunk adapters are averaged (weighted by the samples each trained on) and every
  replica continues from the average.

Replicas share the frozen base weights (only LoRA weights are copied). Each round starts the
trunk optimiser afresh, as clients do theirs, so a run resumed from a checkpoint continues
exactly as the uninterrupted run would.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
import torch
from torch import Tensor

from fedtune.config import SplitConfig
from fedtune.split.batching import BatchingTrunkService
from fedtune.split.partition_model import Trunk
from fedtune.split.protocol import Message
from fedtune.split.server import TrunkOptim, TrunkService, _Pending, serve

log = logging.getLogger(__name__)


class _Counting(TrunkService):
    """A trunk service that counts the samples each BACKWARD trained on (the replica's averaging weight)."""

    samples = 0

    def _backward(self, message: Message, pending: _Pending) -> Message:
        out = super()._backward(message, pending)
        self.samples += int(pending.h1.shape[0])
        return out


class _CountingBatch(_Counting, BatchingTrunkService):
    pass


def replicate(trunk: Trunk) -> Trunk:
    """A copy of ``trunk`` with its own LoRA weights and the same (shared) frozen weights."""
    shared: dict[int, Tensor] = {id(p): p for p in trunk.parameters() if not p.requires_grad}
    shared.update({id(b): b for b in trunk.buffers()})
    return copy.deepcopy(trunk, memo=shared)


def average_states(states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """Weighted mean of state dicts with equal keys; equal weights when all weights are 0."""
    if sum(weights) <= 0:
        weights = [1.0] * len(states)
    total = float(sum(weights))
    return {
        key: sum(s[key].to(torch.float32) * (w / total) for s, w in zip(states, weights, strict=True))  # type: ignore[misc]
        for key in states[0]
    }


def trunk_address(addresses: Sequence[str], partition_id: int) -> str:
    """The trunk service client ``partition_id`` uses: replica ``partition_id % len(addresses)``."""
    return addresses[partition_id % len(addresses)]


class TrunkHost:
    """Trunk service(s) of a split run, bound to ``split.host`` and reachable at :attr:`addresses`.

    Parameters
    ----------
    trunk
        The trunk cut from the LoRA-wrapped model, its adapter already loaded.
    split
        The run's ``split`` section.
    lr
        The trunk optimiser's learning rate (``split.trunk_lr`` or ``train.lr``).
    step_every
        BACKWARDs per trunk optimiser step (``train.grad_accum``: the clients' micro-batches).
    """

    def __init__(self, trunk: Trunk, split: SplitConfig, lr: float, step_every: int = 1) -> None:
        self.split = split
        self.optim = TrunkOptim(lr=lr, step_every=step_every)
        groups = split.groups if split.mode == "hierarchical" else 1
        replicas = [trunk] + [replicate(trunk) for _ in range(groups - 1)]
        limit = int(split.max_message_mib * 2**20)
        self.services: list[TrunkService] = []
        for replica in replicas:
            if split.mode == "client-batch":
                service: TrunkService = _CountingBatch(replica, self.optim, limit, wait_s=split.batch_wait_s)
            else:
                service = _Counting(replica, self.optim, limit)
            self.services.append(service)
        tls = None
        if split.tls_cert and split.tls_key:
            tls = (Path(split.tls_cert).read_bytes(), Path(split.tls_key).read_bytes())
        self.servers: list[grpc.Server] = []
        self.addresses: list[str] = []
        public = split.public_host or split.host
        try:
            for g, service in enumerate(self.services):
                server, port = serve(service, split.host, split.port + g if split.port else 0, tls)
                self.servers.append(server)
                self.addresses.append(f"{public}:{port}")
        except BaseException:
            self.stop()
            raise
        log.info("trunk service (%s): %s", split.mode, ", ".join(self.addresses))

    @property
    def keys(self) -> set[str]:
        """The trunk adapter's state-dict keys (peft names)."""
        return set(self.services[0].trunk.adapter_state_dict())

    def address_for(self, partition_id: int) -> str:
        return trunk_address(self.addresses, partition_id)

    def load_adapter(self, state: Mapping[str, Tensor]) -> None:
        """Put the trunk adapter ``state`` (may hold other keys too) into every replica."""
        for service in self.services:
            with service._lease:
                service.trunk.load_adapter_state_dict(state)

    def begin_round(self) -> None:
        """A fresh trunk optimiser and sample counts on every replica."""
        self._passes_before = [self._passes(s) for s in self.services]
        for service in self.services:
            with service._lease:
                params = [p for n, p in service.trunk.named_parameters() if "lora_" in n and p.requires_grad]
                service.optimizer = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=0.0)
                service.samples = 0  # type: ignore[attr-defined]

    @staticmethod
    def _passes(service: TrunkService) -> int:
        """Training passes through the trunk so far (a client-batch pass serves several steps)."""
        if isinstance(service, BatchingTrunkService):
            return len(service.batch_sizes)
        return service._backwards

    def round_stats(self) -> dict[str, int]:
        """The round's trunk work: samples trained on and training passes, over all replicas."""
        before = getattr(self, "_passes_before", [0] * len(self.services))
        return {
            "trunk_samples": sum(int(getattr(s, "samples", 0)) for s in self.services),
            "trunk_passes": sum(self._passes(s) - b for s, b in zip(self.services, before, strict=True)),
        }

    def end_round(self) -> dict[str, Tensor]:
        """Average the replicas' trunk adapters (weighted by samples) into all; returns the average."""
        states = [s.adapter_state_dict() for s in self.services]
        if len(states) == 1:
            return states[0]
        weights = [float(getattr(s, "samples", 0)) for s in self.services]
        mean = average_states(states, weights)
        self.load_adapter(mean)
        log.info("trunk replicas averaged (samples %s)", weights)
        return mean

    def adapter_state(self) -> dict[str, Tensor]:
        return self.services[0].adapter_state_dict()

    def stop(self, grace: float = 1.0) -> None:
        for server in self.servers:
            server.stop(grace).wait()
        self.servers.clear()


__all__ = ["TrunkHost", "average_states", "replicate"]
