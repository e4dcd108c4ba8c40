"""FedProx (Li et al., 2020): FedAvg with a proximal term in every client's loss."""

from __future__ import annotations

import dataclasses

from flwr.app import MessageType

from fedtune.federated.protocol import Instruction
from fedtune.federated.strategies.base import AdapterStrategy, Arrays


class FedProxStrategy(AdapterStrategy):
    """FedAvg + ``mu/2 ||w - w_global||^2`` in each client's loss (``fed.proximal_mu``)."""

    def instruction(self, pid: int, global_state: Arrays, message_type: str) -> tuple[Instruction, Arrays]:
        inst, reference = super().instruction(pid, global_state, message_type)
        if message_type == MessageType.TRAIN:
            inst = dataclasses.replace(inst, proximal_mu=self.cfg.fed.proximal_mu)
        return inst, reference
