"""Zero-padding (the FLoRA paper's baseline for mixed ranks): pad to the largest rank and average.

A and B are averaged separately after padding (not exact: the mean of products is not the
product of means); each client restarts from the first ``r_k`` ranks of the global adapter.
"""

from __future__ import annotations

import numpy as np

from fedtune.federated.aggregation.ranks import zero_pad
from fedtune.federated.strategies.base import Arrays, Update
from fedtune.federated.strategies.ranks import RankedStrategy, is_zero, state_rank


class ZeroPadStrategy(RankedStrategy):
    """Zero-pad to the largest rank and average; clients keep their first r_k ranks."""

    def aggregate_updates(self, updates: list[Update]) -> Arrays:
        return zero_pad(
            [u.state for u in updates], [u.weight for u in updates], [self.scaling(u.pid) for u in updates]
        )

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
