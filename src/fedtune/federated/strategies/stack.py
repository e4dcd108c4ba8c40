"""FLoRA: exact aggregation of mixed-rank adapters by stacking (``fed.strategy = "stack"``).

The round's update is :func:`~fedtune.federated.aggregation.ranks.stack` of the clients'
adapters, exactly ``Σ p_k s_k B_k A_k``. ``fed.stack_mode`` picks the continuation:

- ``merge`` (FLoRA's own): every round clients start *fresh* rank-``r_k`` adapters on top of
  the frozen global update; the global is the cumulative stack of all rounds (its rank
  grows by ``Σ r_k`` a round), sent as stacked factors, never as a full weight matrix. A
  client keeps the stack it last received on its disk and is sent only what was stacked
  since (:mod:`~fedtune.federated.stack_cache`); ``_held`` is the rank each client holds,
  updated when its reply comes back fine, forgotten when it fails.
- ``svd`` (FlexLoRA's warm start): the global is the round's exact stack of the clients'
  full adapters; each client restarts from its best rank-``r_k`` approximation (truncated
  SVD of ΔW), so adapters are not restarted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flwr.app import ArrayRecord, MessageType

from fedtune.config import Config
from fedtune.federated import stack_cache
from fedtune.federated.aggregation.ranks import aggregate_delta, fuse, project, stack
from fedtune.federated.protocol import Instruction
from fedtune.federated.records import to_record
from fedtune.federated.strategies.base import Arrays, Update
from fedtune.federated.strategies.ranks import RankedStrategy, is_zero


class StackStrategy(RankedStrategy):
    """FLoRA stacking; ``fed.stack_mode`` picks the continuation (see module docstring)."""

    def __init__(self, cfg: Config, clients: dict[int, int]) -> None:
        super().__init__(cfg, clients)
        self._held: dict[int, int] = {}  # partition id -> rank of the stack on that client's disk
        self._offered: dict[int, int] = {}  # partition id -> rank of the stack in this phase's message
        self._tails: dict[tuple[int, str, int], ArrayRecord] = {}

    def instruction(self, pid: int, global_state: Arrays, message_type: str) -> tuple[Instruction, Arrays]:
        inst, reference = super().instruction(pid, global_state, message_type)
        field = "frozen" if message_type == MessageType.TRAIN else "adapter"
        if self.cfg.fed.stack_mode != "merge" or getattr(inst, field) is None:
            return inst, reference
        whole = self.frozen_state(global_state) if field == "frozen" else global_state
        assert whole is not None
        rank = stack_cache.uniform_rank(whole)
        if rank is None or is_zero(whole):
            # not a stack of equal-rank modules, or the zero start, which the first round's
            # stack replaces rather than extends: send it whole, hold nothing
            return inst, reference
        held = self._held.get(pid, 0)
        if held > rank:  # cannot happen for a growing stack; be safe and send it whole
            held = 0
        # held 0: the whole stack (the client caches it either way); else only the part beyond it
        changes: dict[str, Any] = {f"{field}_from": held, "run_dir": self.run_dir}
        if held > 0:
            changes[field] = self._tail(whole, held, message_type) if held < rank else None
        self._offered[pid] = rank
        return dataclasses.replace(inst, **changes), reference

    def _tail(self, whole: Arrays, held: int, message_type: str) -> ArrayRecord:
        """The stack beyond rank ``held``, encoded once per (round, phase, held)."""
        tag = (self.current_round, str(message_type), held)
        if tag not in self._tails:
            self._tails = {t: r for t, r in self._tails.items() if t[0] == self.current_round}
            self._tails[tag] = to_record(
                stack_cache.tail(whole, held), self.cfg.fed.wire_dtype, self.cfg.fed.wire_block
            )
        return self._tails[tag]

    def replies_read(self, fine: set[int]) -> None:
        for pid, rank in self._offered.items():
            if pid in fine:
                self._held[pid] = rank
            else:  # it may not hold what it was sent: send the whole stack next time
                self._held.pop(pid, None)
        self._offered = {}

    def aggregate_updates(self, updates: list[Update]) -> Arrays:
        round_update = stack(
            [u.state for u in updates], [u.weight for u in updates], [self.scaling(u.pid) for u in updates]
        )
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
