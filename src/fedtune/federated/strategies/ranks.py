"""The base of strategies whose clients train different LoRA ranks (``model.lora.ranks``).

Client ``k`` trains a rank-``r_k`` adapter with scaling ``s_k = alpha / r_k``. The server
keeps the *global* adapter at scaling 1, so its ``B @ A`` is the global update ΔW itself;
it is saved as a peft folder with ``r = lora_alpha = R`` (its rank) and served that way by
eval and chat. Evaluation sends the global adapter (job ``GLOBAL``); training sends each
client its own start state (job ``RANKED``), optionally on top of a frozen global update.
"""

from __future__ import annotations

import numpy as np
from flwr.app import MessageType

from fedtune.config import Config, LoraConfig
from fedtune.federated.aggregation.ranks import fresh_like, module_ranks, rank_rule
from fedtune.federated.protocol import Instruction, Job
from fedtune.federated.records import to_record
from fedtune.federated.strategies.base import AdapterStrategy, Arrays


def is_zero(state: Arrays) -> bool:
    """True when the adapter's update is zero (every B is zero), as a fresh LoRA's is."""
    return not any(np.any(v) for k, v in state.items() if ".lora_B." in k)


def state_rank(state: Arrays) -> int:
    """The adapter's rank: the largest of its modules' ranks."""
    return max(module_ranks(state).values())


class RankedStrategy(AdapterStrategy):
    """Per-client ranks; the global adapter lives at scaling 1 (see module docstring)."""

    def __init__(self, cfg: Config, clients: dict[int, int]) -> None:
        super().__init__(cfg, clients)
        lora = cfg.model.lora
        n = cfg.partition.num_partitions
        self.ranks = rank_rule(lora.ranks, n) if lora.ranks is not None else [lora.r] * n
        self._fresh: dict[tuple[int, int], Arrays] = {}

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
        """Where client ``pid`` starts training this round (rank ``ranks[pid]``)."""
        raise NotImplementedError

    def frozen_state(self, global_state: Arrays) -> Arrays | None:
        """An update every client trains on top of (frozen), or None."""
        return None

    def instruction(self, pid: int, global_state: Arrays, message_type: str) -> tuple[Instruction, Arrays]:
        if message_type != MessageType.TRAIN:  # evaluate the global model: base + ΔW at scaling 1
            adapter = self.wire_global(global_state)
            return self.make_instruction(
                Job.GLOBAL, adapter=adapter, rank=state_rank(global_state)
            ), global_state
        start = self.start_state(pid, global_state, self.current_round)
        frozen = self.frozen_state(global_state)
        inst = self.make_instruction(
            Job.RANKED,
            adapter=to_record(start, self.cfg.fed.wire_dtype, self.cfg.fed.wire_block),
            rank=self.ranks[pid],
            frozen=None if frozen is None else self.wire_global(frozen),
            frozen_rank=None if frozen is None else state_rank(frozen),
        )
        return inst, start
