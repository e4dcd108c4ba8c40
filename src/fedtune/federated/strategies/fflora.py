"""FF-LoRA: a global adapter averaged by FedAvg, fused with a personal adapter per client.

Every client trains the global adapter ("default") and a personal one together, summed
in the forward pass; only the global one leaves the client. The personal adapter is kept
on the client's disk per round (:mod:`fedtune.federated.personal`), so resume is exact.
Clients report held-out loss for the fused model (``eval_loss``) and for the global and
personal adapters alone (``eval_loss_global``, ``eval_loss_personal``).
"""

from __future__ import annotations

import dataclasses

from fedtune.federated.protocol import Instruction, Job
from fedtune.federated.strategies.base import AdapterStrategy, Arrays


class FFLoraStrategy(AdapterStrategy):
    """FedAvg over the global adapter; personal adapters stay on the clients."""

    def instruction(self, pid: int, global_state: Arrays, message_type: str) -> tuple[Instruction, Arrays]:
        inst, reference = super().instruction(pid, global_state, message_type)
        lora = self.cfg.model.lora
        inst = dataclasses.replace(inst, job=Job.FFLORA, rank=lora.personal_r or lora.r, run_dir=self.run_dir)
        return inst, reference
