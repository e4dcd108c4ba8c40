"""Split learning in the federated round loop, and the rules a split run must satisfy.

The round loop (:mod:`fedtune.federated.server_app`) knows nothing of split learning but
a :class:`RoundHook`: plain runs use the no-op base; split runs use :class:`SplitRounds`,
which starts the trunk service(s) (:class:`~fedtune.split.host.TrunkHost`), keeps the trunk's
adapter out of what Flower carries (clients get head + tail only), tells every instruction
where the trunk services are, and puts the trunk's adapter back into every checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedtune.config import Config
from fedtune.errors import FedtuneError


class RoundHook:
    """What a run adds around the round loop; this base adds nothing."""

    def client_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of the global adapter that Flower carries to the clients."""
        return dict(state)

    def instruction_fields(self) -> dict[str, Any]:
        """Fields added to every instruction."""
        return {}

    def begin_round(self) -> None:
        """Before a round's train messages go out."""

    def end_round(self) -> dict[str, int]:
        """After the round's updates are aggregated; returns values for the round's server line."""
        return {}

    def whole(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter to checkpoint: the clients' part plus whatever this hook holds."""
        return dict(state)

    def stop(self) -> None:
        """The run is over (or failed)."""


class SplitRounds(RoundHook):
    """Split learning: the trunk's adapter lives in the trunk service(s), not in Flower's messages."""

    def __init__(self, cfg: Config, state: Mapping[str, torch.Tensor]) -> None:
        from fedtune.split.host import TrunkHost
        from fedtune.split.lm import parts_from_config

        trunk = parts_from_config(cfg).trunk
        trunk.load_adapter_state_dict(dict(state))
        self.host = TrunkHost(trunk, cfg.split, cfg.split.trunk_lr or cfg.train.lr, cfg.train.grad_accum)

    def client_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if k not in self.host.keys}

    def instruction_fields(self) -> dict[str, Any]:
        return {"trunk_addresses": tuple(self.host.addresses)}

    def begin_round(self) -> None:
        self.host.begin_round()

    def end_round(self) -> dict[str, int]:
        stats = self.host.round_stats()
        self.host.end_round()  # hierarchical: the replicas' trunk adapters averaged
        return stats

    def whole(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**state, **self.host.adapter_state()}

    def stop(self) -> None:
        self.host.stop()


def round_hook(cfg: Config, state: Mapping[str, torch.Tensor]) -> RoundHook:
    """The hook for ``cfg``: :class:`SplitRounds` when ``split.enabled``, else the no-op one."""
    return SplitRounds(cfg, state) if cfg.split.enabled else RoundHook()


def check_split(cfg: Config) -> None:
    """Check that a split run's model and cut make sense, without loading weights.

    The strategy is checked by its registry entry (``Capabilities.split``).
    """
    from fedtune.models.load import load_model_config
    from fedtune.split.partition_model import GPT2_FAMILY, LLAMA_FAMILY

    if cfg.model.lora.ranks is not None:
        raise FedtuneError("model.lora.ranks: per-client ranks do not apply to split runs")
    config = load_model_config(cfg.model)
    if config.model_type not in LLAMA_FAMILY | GPT2_FAMILY:
        raise FedtuneError(
            f"model.name: split learning supports {sorted(LLAMA_FAMILY | GPT2_FAMILY)} models, "
            f"not {config.model_type!r}"
        )
    layers = int(config.num_hidden_layers)
    if cfg.split.n_head + cfg.split.n_tail >= layers:
        raise FedtuneError(
            f"split.n_head + split.n_tail: {cfg.split.n_head} + {cfg.split.n_tail} leaves no block "
            f"for the trunk of a {layers}-layer model"
        )
    for key in ("tls_cert", "tls_key", "tls_root_cert"):
        value = getattr(cfg.split, key)
        if value is not None and not Path(value).is_file():
            raise FedtuneError(f"split.{key}: {value} is not a file")
