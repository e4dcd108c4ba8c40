"""Clients with different LoRA ranks: FLoRA stacking (two continuations) and zero-padding.

Client ``k`` trains a rank-``r_k`` adapter with scaling ``s_k = alpha / r_k``
(``model.lora.ranks``). The server keeps the *global* adapter at scaling 1, so its
``B @ A`` is the global update ΔW itself; it is saved as a peft folder with
``r = lora_alpha = R`` (its rank) and served that way by eval and chat.

- ``stack`` (FLoRA): the round's update is :func:`hetero.stack` of the clients'
  adapters, exactly ``Σ p_k s_k B_k A_k``. ``fed.stack_mode``:

  - ``merge`` (FLoRA's own): every round clients start *fresh* rank-``r_k`` adapters on
    top of the frozen global update; the global is the cumulative stack of all rounds
    (its rank grows by ``Σ r_k`` a round), sent as stacked factors, never as a full
    weight matrix. Clients hold no state between messages (fit for Flower deployment);
    the price is a download that grows with the rounds.
  - ``svd`` (FlexLoRA's warm start): the global is the round's exact stack of the
    clients' full adapters; each client restarts from its best rank-``r_k``
    approximation (truncated SVD of ΔW), so adapters are not restarted.

- ``zero-pad`` (the FLoRA paper's baseline): pad to the largest rank, average A and B
  separately (not exact), clients restart from the first ``r_k`` ranks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MessageType

from fedtune.config import Config, LoraConfig
from fedtune.federated import stack_cache
from fedtune.federated.hetero import (
    aggregate_delta,
    fresh_like,
    fuse,
    module_ranks,
    project,
    rank_rule,
    stack,
    zero_pad,
)
from fedtune.federated.records import to_record
from fedtune.federated.strategies import AdapterStrategy, Arrays, _register


def is_zero(state: Arrays) -> bool:
    """True when the adapter's update is zero (every B is zero), as a fresh LoRA's is."""
    return not any(np.any(v) for k, v in state.items() if ".lora_B." in k)


def state_rank(state: Arrays) -> int:
    return max(module_ranks(state).values())


class HeteroStrategy(AdapterStrategy):
    """Per-client ranks; the global adapter lives at scaling 1 (see module docstring)."""

    def bind(self, cfg: Config, clients: dict[int, int]) -> HeteroStrategy:
        super().bind(cfg, clients)
        lora = cfg.model.lora
        n = cfg.partition.num_partitions
        self.ranks = rank_rule(lora.ranks, n) if lora.ranks is not None else [lora.r] * n
        self._fresh: dict[tuple[int, int], Arrays] = {}
        self._frozen_wire: ArrayRecord | None = None
        return self

    def scaling(self, pid: int) -> float:
        return self.cfg.model.lora.alpha / self.ranks[pid]

    def fresh(self, rank: int, server_round: int) -> Arrays:
        """A new seeded rank-``rank`` adapter (A random, B zero) for this round."""
        key = (rank, server_round)
        if key not in self._fresh:
            seed = (self.cfg.seed * 1_000_003 + server_round * 10_007 + rank) % (2**31)
            self._fresh = {k: v for k, v in self._fresh.items() if k[1] == server_round}  # keep one round
            self._fresh[key] = fresh_like(self._global, rank, seed)
        return self._fresh[key]

    def global_lora(self, state: Arrays) -> LoraConfig:
        rank = state_rank(state)
        return self.cfg.model.lora.model_copy(
            update={"r": rank, "alpha": rank, "dropout": 0.0, "ranks": None}
        )

    def start_state(self, pid: int, global_state: Arrays, server_round: int) -> Arrays:
        raise NotImplementedError

    def frozen_state(self, global_state: Arrays) -> Arrays | None:
        """An update every client trains on top of (frozen), or None."""
        return None

    def client_payload(
        self, pid: int, global_state: Arrays, message_type: str, server_round: int
    ) -> tuple[dict[str, ArrayRecord], dict[str, Any], Arrays]:
        wire = self.cfg.fed.wire_dtype
        if message_type != MessageType.TRAIN:  # evaluate the global model: base + ΔW at scaling 1
            if self._wire_global is None:
                self._wire_global = to_record(global_state, wire)
            return {"arrays": self._wire_global}, {"global-rank": state_rank(global_state)}, global_state
        start = self.start_state(pid, global_state, server_round)
        records = {"arrays": to_record(start, wire)}
        extra: dict[str, Any] = {"rank": self.ranks[pid]}
        frozen = self.frozen_state(global_state)
        if frozen is not None:
            if self._wire_global is None:
                self._wire_global = to_record(frozen, wire)
            records["frozen"] = self._wire_global
            extra["frozen-rank"] = state_rank(frozen)
        return records, extra, start


class StackStrategy(HeteroStrategy):
    """FLoRA: exact aggregation by stacking; ``fed.stack_mode`` picks the continuation.

    In merge mode a client that holds the stack from an earlier message gets only what was
    stacked since (:mod:`~fedtune.federated.stack_cache`): ``_held`` is the rank each client
    holds, updated when its reply comes back fine, forgotten when it fails.
    """

    def bind(self, cfg: Config, clients: dict[int, int]) -> StackStrategy:
        super().bind(cfg, clients)
        self._held: dict[int, int] = {}  # partition id -> rank of the stack on that client's disk
        self._offered: dict[int, int] = {}  # partition id -> rank of the stack in this phase's message
        self._tails: dict[tuple[int, str, int], ArrayRecord] = {}
        return self

    def client_payload(
        self, pid: int, global_state: Arrays, message_type: str, server_round: int
    ) -> tuple[dict[str, ArrayRecord], dict[str, Any], Arrays]:
        records, extra, reference = super().client_payload(pid, global_state, message_type, server_round)
        key = "frozen" if message_type == MessageType.TRAIN else "arrays"
        if self.cfg.fed.stack_mode != "merge" or key not in records:
            return records, extra, reference
        whole = self.frozen_state(global_state) if key == "frozen" else global_state
        assert whole is not None
        rank = stack_cache.uniform_rank(whole)
        if rank is None or is_zero(whole):
            # not a stack of equal-rank modules, or the zero start, which the first round's
            # stack replaces rather than extends: send it whole, hold nothing
            return records, extra, reference
        held = self._held.get(pid, 0)
        if self.run_dir:  # where a simulated client keeps its stack (Flower refuses "" in a config)
            extra["run-dir"] = self.run_dir
        if held > rank:  # cannot happen for a growing stack; be safe and send it whole
            held = 0
        extra[f"{key}-from"] = held  # 0: the whole stack (the client caches it either way)
        if held > 0:
            del records[key]
            if held < rank:
                tag = (server_round, str(message_type), held)
                if tag not in self._tails:
                    self._tails = {t: r for t, r in self._tails.items() if t[0] == server_round}
                    self._tails[tag] = to_record(stack_cache.tail(whole, held), self.cfg.fed.wire_dtype)
                records[key] = self._tails[tag]
        self._offered[pid] = rank
        return records, extra, reference

    def _valid_sorted(self, replies: Any, is_train: bool) -> list[Any]:
        valid = super()._valid_sorted(replies, is_train)
        fine = {int(m.content["metrics"]["partition-id"]) for m in valid}  # type: ignore[arg-type]
        for pid, rank in self._offered.items():
            if pid in fine:
                self._held[pid] = rank
            else:  # it may not hold what it was sent: send the whole stack next time
                self._held.pop(pid, None)
        self._offered = {}
        return valid

    def aggregate_states(self, states: list[Arrays], weights: list[int], clients: list[int]) -> Arrays:
        round_update = stack(states, weights, [self.scaling(p) for p in clients])
        if self.cfg.fed.stack_mode == "merge" and not is_zero(self._global):
            return fuse(self._global, 1.0, round_update, 1.0)  # cumulative: previous rounds + this one
        return round_update

    def start_state(self, pid: int, global_state: Arrays, server_round: int) -> Arrays:
        rank = self.ranks[pid]
        if self.cfg.fed.stack_mode == "merge" or is_zero(global_state):
            return self.fresh(rank, server_round)
        delta = aggregate_delta([global_state], [1.0], [1.0])
        return project(delta, rank, self.scaling(pid))

    def frozen_state(self, global_state: Arrays) -> Arrays | None:
        if self.cfg.fed.stack_mode == "merge" and not is_zero(global_state):
            return global_state
        return None


class ZeroPadStrategy(HeteroStrategy):
    """Baseline: zero-pad to the largest rank and average; clients keep their first r_k ranks."""

    def aggregate_states(self, states: list[Arrays], weights: list[int], clients: list[int]) -> Arrays:
        return zero_pad(states, weights, [self.scaling(p) for p in clients])

    def start_state(self, pid: int, global_state: Arrays, server_round: int) -> Arrays:
        rank = self.ranks[pid]
        if is_zero(global_state):
            return self.fresh(rank, server_round)
        s = self.scaling(pid)
        fresh = self.fresh(rank, server_round)
        have = state_rank(global_state)
        out = {}
        for key, value in global_state.items():  # the global folds scaling into A: undo it
            if ".lora_A." in key:
                # ranks the global lacks (no client that big this round) start fresh: random A, zero B
                out[key] = np.concatenate([value[:rank] / s, fresh[key][have:rank]])
            else:
                out[key] = np.concatenate([value[:, :rank], np.zeros_like(fresh[key][:, have:rank])], axis=1)
        return out


_register("stack", StackStrategy, lambda cfg: {})
_register("zero-pad", ZeroPadStrategy, lambda cfg: {})
