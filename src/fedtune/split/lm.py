"""Head + trunk + tail as one causal LM, with the trunk local or across the transport.

:class:`SplitLM` has the interface that :func:`fedtune.training.local.train` and
:func:`~fedtune.training.local.evaluate` use (``model(input_ids=, attention_mask=, labels=)``
returning ``.loss`` and ``.logits``), so a split client trains with exactly the loop, schedule,
clipping and FedProx term of an ordinary client. With a :class:`RemoteTrunk`, autograd crosses the
network: the forward sends FORWARD and waits for h2, and the backward of that same node sends
dL/dh2 (BACKWARD) and returns the trunk's dL/dh1 to the head. Only the head's and tail's
parameters belong to the module, so a client optimiser never sees the trunk.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutput

from fedtune.config import Config
from fedtune.split.client import RemoteTrunk
from fedtune.split.partition_model import Head, SplitParts, Tail, Trunk, cut_model, valid_counts


class SplitLM(nn.Module):
    """A causal LM made of a client's head and tail around a trunk (a local module or remote).

    Batches must be right-padded (every fedtune tokenizer pads right); the attention mask is
    turned into per-sample valid counts, which is all the trunk receives besides h1.
    """

    def __init__(self, head: Head, trunk: Trunk | RemoteTrunk, tail: Tail) -> None:
        super().__init__()
        self.head = head
        self.tail = tail
        if isinstance(trunk, nn.Module):
            self.trunk: Any = trunk  # registered: in process its weights train with the rest
        else:
            object.__setattr__(self, "trunk", trunk)  # not a submodule: no parameters here

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> CausalLMOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = valid_counts(attention_mask)
        h1 = self.head(input_ids, valid)
        h2 = self.trunk(h1, valid)
        logits, loss = self.tail(h2, valid, labels)
        return CausalLMOutput(loss=loss, logits=logits)


def parts_from_config(cfg: Config, *, client_only: bool = False) -> SplitParts:
    """Load ``cfg.model``, wrap it with ``cfg.model.lora`` (seeded) and cut it at ``cfg.split``.

    ``client_only`` then drops the trunk's blocks from the model (the returned trunk keeps no
    blocks), so a client process holds only its head and tail in memory.
    """
    from fedtune.models.adapters import attach_lora
    from fedtune.models.load import load_model

    model = attach_lora(load_model(cfg.model), cfg.model.lora, seed=cfg.seed)
    model.eval()
    parts = cut_model(model, cfg.split.n_head, cfg.split.n_tail)
    if client_only:
        base: Any = model.get_base_model()
        blocks = base.model.layers if hasattr(base, "model") else base.transformer.h
        for i in parts.trunk.layer_range:
            blocks[i] = nn.Identity()
        parts.trunk.blocks = nn.ModuleList()
    return parts


__all__ = ["SplitLM", "parts_from_config"]
