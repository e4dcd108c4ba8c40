"""fedtune's strategies: one per file, one checked registry whose entries carry capabilities.

A run names its strategy with ``fed.strategy``; :func:`check_strategy` looks it up and checks
that it fits the run (mixed ranks, split learning) before anything is started, reading the
entry's :class:`Capabilities` — nobody keeps a second list.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.config import Config
from fedtune.errors import FedtuneError
from fedtune.federated.aggregation.ranks import rank_rule
from fedtune.federated.aggregation.secagg import check_secagg
from fedtune.federated.failures import train_quorum
from fedtune.federated.records import blockwise
from fedtune.federated.strategies.base import AdapterStrategy, sample_clients
from fedtune.federated.strategies.fedavg import FedAvgStrategy
from fedtune.federated.strategies.fedprox import FedProxStrategy
from fedtune.federated.strategies.fflora import FFLoraStrategy
from fedtune.federated.strategies.robust import KrumStrategy, MedianStrategy, TrimmedMeanStrategy
from fedtune.federated.strategies.scaffold import ScaffoldStrategy
from fedtune.federated.strategies.server_opt import (
    FedAdagradStrategy,
    FedAdamStrategy,
    FedAvgMStrategy,
    FedYogiStrategy,
)
from fedtune.federated.strategies.stack import StackStrategy
from fedtune.federated.strategies.zero_pad import ZeroPadStrategy
from fedtune.registry import Registry


@dataclass(frozen=True)
class Capabilities:
    """What a strategy works with; checks read these, nobody keeps a second list.

    Attributes
    ----------
    split
        Works with split learning (every client gets the same head + tail adapter).
    mixed_ranks
        Clients may train different LoRA ranks (``model.lora.ranks``).
    client_state
        Clients keep state on their own disk between rounds (FF-LoRA's personal adapter,
        FLoRA's cached stack).
    weighted_sum
        The aggregate is a weighted sum of the client updates, so secure aggregation and
        client-level DP (clip each update, noise the sum) apply.
    restarts
        Clients start new adapter factors every round (FLoRA's fresh or SVD-projected ones), so
        an update's rounding error has no parameter to be carried into (``fed.error_feedback``).
    """

    split: bool = False
    mixed_ranks: bool = False
    client_state: bool = False
    weighted_sum: bool = False
    restarts: bool = False


@dataclass(frozen=True)
class StrategyEntry:
    """A registered strategy: its class and what it supports; ``summary`` is its docstring's first line."""

    cls: type[AdapterStrategy]
    capabilities: Capabilities

    @property
    def summary(self) -> str:
        return (self.cls.__doc__ or "").strip().splitlines()[0]


STRATEGIES: Registry[StrategyEntry] = Registry("strategy")

_SHARED = Capabilities(split=True, weighted_sum=True)  # same adapter for all, a weighted mean
_ROBUST = Capabilities(split=True)  # same adapter for all, not a sum
for _name, _entry in {
    "fedavg": StrategyEntry(FedAvgStrategy, _SHARED),
    "fedprox": StrategyEntry(FedProxStrategy, _SHARED),
    # the server step is applied to the clients' weighted mean, which is a sum
    "fedavgm": StrategyEntry(FedAvgMStrategy, _SHARED),
    "fedadam": StrategyEntry(FedAdamStrategy, _SHARED),
    "fedyogi": StrategyEntry(FedYogiStrategy, _SHARED),
    "fedadagrad": StrategyEntry(FedAdagradStrategy, _SHARED),
    "median": StrategyEntry(MedianStrategy, _ROBUST),
    "trimmed-mean": StrategyEntry(TrimmedMeanStrategy, _ROBUST),
    "krum": StrategyEntry(KrumStrategy, _ROBUST),
    "fflora": StrategyEntry(FFLoraStrategy, Capabilities(client_state=True, weighted_sum=True)),
    # stacking concatenates factors: not a sum
    "stack": StrategyEntry(StackStrategy, Capabilities(mixed_ranks=True, client_state=True, restarts=True)),
    # a weighted sum of zero-padded A's and of zero-padded B's
    "zero-pad": StrategyEntry(ZeroPadStrategy, Capabilities(mixed_ranks=True, weighted_sum=True)),
    # the server needs every client's own update for its control variate
    "scaffold": StrategyEntry(ScaffoldStrategy, Capabilities()),
}.items():
    STRATEGIES.add(_name, _entry)


def check_strategy(cfg: Config) -> StrategyEntry:
    """The entry named by ``fed.strategy``, checked against the run's ranks and split setting."""
    entry = STRATEGIES.get(cfg.fed.strategy, where="fed.strategy")
    caps = entry.capabilities
    lora, n = cfg.model.lora, cfg.partition.num_partitions
    if caps.mixed_ranks:
        rank_rule(lora.ranks if lora.ranks is not None else [lora.r] * n, n)
    elif lora.ranks is not None:
        mixed = " or ".join(repr(k) for k in STRATEGIES if STRATEGIES.get(k).capabilities.mixed_ranks)
        raise FedtuneError(
            f"model.lora.ranks: per-client ranks need fed.strategy {mixed}, not {cfg.fed.strategy!r}"
        )
    if lora.freeze_a and (caps.mixed_ranks or cfg.split.enabled or cfg.fed.strategy == "scaffold"):
        raise FedtuneError(
            f"model.lora.freeze_a: FFA-LoRA needs one adapter shape for all and no split or control "
            f"variates; not with fed.strategy {cfg.fed.strategy!r}"
            + (" and split.enabled" if cfg.split.enabled else "")
        )
    if cfg.privacy.dp and not caps.weighted_sum:
        sums = ", ".join(k for k in STRATEGIES if STRATEGIES.get(k).capabilities.weighted_sum)
        raise FedtuneError(
            f"fed.strategy: {cfg.fed.strategy!r} is not a weighted sum of the updates, so client-level DP "
            f"(privacy.dp) does not apply; use one of {sums}"
        )
    if cfg.split.enabled and not caps.split:
        fits = ", ".join(k for k in STRATEGIES if STRATEGIES.get(k).capabilities.split)
        raise FedtuneError(
            f"fed.strategy: {cfg.fed.strategy!r} does not apply to split runs (split.enabled); "
            f"use one of {fits}"
        )
    check_quorum(cfg)
    if cfg.privacy.secagg.enabled:
        if not caps.weighted_sum:
            sums = ", ".join(k for k in STRATEGIES if STRATEGIES.get(k).capabilities.weighted_sum)
            raise FedtuneError(
                f"privacy.secagg: fed.strategy {cfg.fed.strategy!r} is not a weighted sum of the updates, "
                f"and a sum is all SecAgg+ reveals; use one of {sums}"
            )
        fed = cfg.fed  # the round's sample size, as the strategy draws it
        check_secagg(cfg, len(sample_clients(range(n), fed.fraction_train, fed.min_train_clients, 0, 1)))
    check_error_feedback(cfg, caps)
    return entry


def check_quorum(cfg: Config) -> None:
    """Refuse a train quorum above the clients a round samples, and retries under client-level DP.

    A retried train phase is a second sampling event in its round, which the DP accountant's
    one-sample-per-round analysis does not cover, so DP runs stop instead of retrying.
    """
    fed, n = cfg.fed, cfg.partition.num_partitions
    sampled = len(sample_clients(range(n), fed.fraction_train, fed.min_train_clients, 0, 1))
    if (need := train_quorum(fed, sampled)) > sampled:
        raise FedtuneError(
            f"fed.min_train_replies={fed.min_train_replies} / fed.min_train_fraction="
            f"{fed.min_train_fraction}: a round needs {need} good train replies but "
            f"samples only {sampled} clients (partition.num_partitions={n}, fed.fraction_train="
            f"{fed.fraction_train}, fed.min_train_clients={fed.min_train_clients})"
        )
    if cfg.privacy.dp and fed.round_retries > 0:
        raise FedtuneError(
            f"fed.round_retries={fed.round_retries}: a retried train phase samples again, which the "
            "privacy accounting (privacy.dp) does not cover; set fed.round_retries=0"
        )


def check_error_feedback(cfg: Config, caps: Capabilities) -> None:
    """``fed.error_feedback`` needs updates this side quantises, into parameters that persist.

    Under client-level DP the update is clipped and sent in float32 and under SecAgg+ Flower
    quantises the update itself, so there is no rounding of fedtune's to feed back.
    """
    fed = cfg.fed
    if not fed.error_feedback:
        return
    why = None
    if not blockwise(fed.wire_dtype):
        why = f"needs fed.wire_dtype 'int8' or 'nf4', not {fed.wire_dtype!r} (no rounding to feed back)"
    elif cfg.privacy.dp:
        why = "not with privacy.dp: a private update is clipped and sent in float32, not quantised"
    elif cfg.privacy.secagg.enabled:
        why = "not with privacy.secagg: SecAgg+ quantises the update itself, fedtune's codes are not used"
    elif caps.restarts:
        why = f"not with fed.strategy {fed.strategy!r}: its clients start new adapter factors every round"
    if why:
        raise FedtuneError(f"fed.error_feedback: {why}")


def build_strategy(cfg: Config, clients: dict[int, int]) -> AdapterStrategy:
    """The strategy named by ``fed.strategy`` for ``clients`` (node id -> partition id)."""
    return check_strategy(cfg).cls(cfg, clients)


__all__ = [
    "STRATEGIES",
    "AdapterStrategy",
    "Capabilities",
    "StrategyEntry",
    "build_strategy",
    "check_error_feedback",
    "check_quorum",
    "check_strategy",
    "sample_clients",
]
