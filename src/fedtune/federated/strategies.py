"""Flower strategies over LoRA adapters: Flower's own, with fedtune's plumbing mixed in.

:class:`AdapterStrategy` is Flower's FedAvg with what an LLM run needs:

- clients are sampled by partition id from an RNG seeded per (seed, round) (node ids
  are random per run, so Flower's sampling could not be resumed exactly);
- the adapter is cast to the wire dtype on the way down; the server keeps float32;
- every incoming update is checked (keys, shapes, dtype, NaN/Inf) and, optionally,
  rejected as a huge-norm outlier or norm-clipped; a bad update is logged and left
  out, the round goes on;
- replies are aggregated in partition order by a pure function
  (:meth:`aggregate_states`), so results do not depend on reply order;
- per-client metrics and payload bytes go to ``round_log`` for ``metrics.jsonl``.

Flower's server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) and FedProx are used
as they are, by putting them before :class:`AdapterStrategy` in the class bases: their
``aggregate_train`` applies the server step to what ours aggregated, their
``configure_train`` records the current global adapter (and FedProx adds
``proximal-mu`` to the config) before ours sends it. Their state (moments, momentum)
is saved with every round's checkpoint, so resume stays exact.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from fedtune.config import Config, LoraConfig
from fedtune.errors import FedtuneError
from fedtune.federated.aggregate import fedavg, weighted_mean
from fedtune.federated.hetero import rank_rule
from fedtune.federated.records import from_record, to_record
from fedtune.federated.validate import clip_update, filter_updates
from fedtune.registry import Registry

log = logging.getLogger(__name__)

STRATEGIES: Registry[Callable[[Config], dict[str, Any]]] = Registry("strategy")
_CLASSES: dict[str, type[AdapterStrategy]] = {}

Arrays = dict[str, np.ndarray]


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's payload: tensor data, keys, configs and metrics."""
    return sum(record.count_bytes() for record in content.values())


def sample_clients(
    partition_ids: Iterable[int], fraction: float, minimum: int, seed: int, server_round: int
) -> list[int]:
    """A reproducible sample: ``max(minimum, floor(fraction * n))`` ids, drawn per (seed, round)."""
    ids = sorted(partition_ids)
    size = min(len(ids), max(minimum, math.floor(fraction * len(ids))))
    if size >= len(ids):
        return ids
    rng = random.Random(f"fedtune-{seed}-{server_round}")
    return sorted(rng.sample(ids, size))


class AdapterStrategy(FedAvg):
    """FedAvg over adapter state dicts, weighted by each client's training examples."""

    cfg: Config
    run_dir: str = ""

    def bind(self, cfg: Config, clients: dict[int, int]) -> AdapterStrategy:
        """Attach the run config and the node id -> partition id map (after ``__init__``)."""
        self.cfg = cfg
        self.config_text = cfg.to_toml()
        self.node_of = {pid: node for node, pid in clients.items()}  # partition id -> node id
        self.round_log: list[dict[str, Any]] = []
        self._sent: dict[int, int] = {}  # node id -> bytes sent this phase
        self._references: dict[int, Arrays] = {}  # partition id -> start state sent this round
        self._wire_global: ArrayRecord | None = None
        self._global: Arrays = {}  # the global adapter at the start of this round
        self.current_round = 0  # the round being aggregated (for round-dependent rules)
        return self

    def global_lora(self, state: Arrays) -> LoraConfig:
        """The LoRA config under which the global adapter ``state`` is saved and served."""
        return self.cfg.model.lora

    # -- sending ------------------------------------------------------------------
    def client_payload(
        self, pid: int, global_state: Arrays, message_type: str, server_round: int
    ) -> tuple[dict[str, ArrayRecord], dict[str, Any], Arrays]:
        """What one client is sent: (array records, extra config, the start state its update is
        checked against). Every client gets the global adapter here; strategies whose clients
        differ (heterogeneous ranks) override this."""
        if self._wire_global is None:
            self._wire_global = to_record(global_state, self.cfg.fed.wire_dtype)
        return {"arrays": self._wire_global}, {}, global_state

    def _messages(
        self,
        server_round: int,
        global_state: Arrays,
        config: ConfigRecord,
        message_type: str,
        fraction: float,
        minimum: int,
    ) -> list[Message]:
        if fraction == 0.0:
            return []
        chosen = sample_clients(self.node_of, fraction, minimum, self.cfg.seed, server_round)
        self._wire_global = None
        messages = []
        for pid in chosen:
            records, extra, reference = self.client_payload(pid, global_state, message_type, server_round)
            merged = ConfigRecord(
                {**dict(config), **extra, "server-round": server_round, "fedtune-config": self.config_text}
            )
            record = RecordDict({"config": merged, **records})
            node = self.node_of[pid]
            self._sent[node] = payload_bytes(record)
            if message_type == MessageType.TRAIN:
                self._references[pid] = reference
            messages.append(Message(content=record, message_type=message_type, dst_node_id=node))
        log.debug("round %s %s: clients %s", server_round, message_type, chosen)
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._references = {}
        self._global = from_record(arrays)
        return self._messages(
            server_round, self._global, config, MessageType.TRAIN, self.fraction_train, self.min_train_nodes
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(
            server_round,
            from_record(arrays),
            config,
            MessageType.EVALUATE,
            self.fraction_evaluate,
            self.min_evaluate_nodes,
        )

    # -- receiving ----------------------------------------------------------------
    def _valid_sorted(self, replies: Iterable[Message], is_train: bool) -> list[Message]:
        valid, errors = self._check_and_log_replies(replies, is_train=is_train, validate=False)
        for msg in errors:
            log.warning("client on node %s failed: %s", msg.metadata.src_node_id, msg.error.reason)
        return sorted(valid, key=lambda m: int(m.content["metrics"]["partition-id"]))  # type: ignore[arg-type, index]

    def _log(self, server_round: int, phase: str, msg: Message, fields: dict[str, str]) -> dict[str, Any]:
        metrics: MetricRecord = msg.content["metrics"]  # type: ignore[assignment]
        entry: dict[str, Any] = {
            "round": server_round,
            "phase": phase,
            "client": int(metrics["partition-id"]),  # type: ignore[arg-type]
            "num_examples": int(metrics["num-examples"]),  # type: ignore[arg-type]
            "bytes_down": self._sent.get(msg.metadata.src_node_id, 0),
            "bytes_up": payload_bytes(msg.content),
            "seconds": float(metrics["seconds"]),  # type: ignore[arg-type]
        }
        for out_key, in_key in fields.items():
            if in_key in metrics:
                entry[out_key] = float(metrics[in_key])  # type: ignore[arg-type]
        self.round_log.append(entry)
        return entry

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self._valid_sorted(replies, is_train=True)
        fields = {
            "train_loss": "train-loss",
            "lr": "lr",
            "first_step_at": "first-step-at",
            "trunk_bytes_up": "trunk-bytes-up",  # split runs: what crossed the cut
            "trunk_bytes_down": "trunk-bytes-down",
        }
        entries = [self._log(server_round, "train", m, fields) for m in valid]
        states = [from_record(m.content["arrays"], check_finite=False) for m in valid]  # type: ignore[arg-type]
        fed = self.cfg.fed
        pids = [int(e["client"]) for e in entries]
        kept, reasons = filter_updates(
            states,
            [self._references[p] for p in pids],
            where=[f"client {e['client']}" for e in entries],
            max_norm=None,
            norm_factor=fed.outlier_norm_factor,
        )
        for i, reason in zip(sorted(set(range(len(states))) - set(kept)), reasons, strict=True):
            entries[i]["rejected"] = reason
            log.warning("round %s: update rejected: %s", server_round, reason)
        if not kept:
            return None, None
        states = [states[i] for i in kept]
        if fed.clip_norm is not None:
            refs = [self._references[pids[i]] for i in kept]
            states = [clip_update(s, r, fed.clip_norm) for s, r in zip(states, refs, strict=True)]
        weights = [entries[i]["num_examples"] for i in kept]
        self.current_round = server_round
        merged = self.aggregate_states(states, weights, [pids[i] for i in kept])
        if merged.keys() == self._global.keys():  # Flower's FedAvgM pairs arrays by position
            merged = {k: merged[k] for k in self._global}
        metrics = MetricRecord(
            {
                "train-loss": weighted_mean([entries[i]["train_loss"] for i in kept], weights),
                "num-clients": len(kept),
            }
        )
        return to_record(merged, "float32"), metrics

    def aggregate_states(self, states: list[Arrays], weights: list[int], clients: list[int]) -> Arrays:
        """The aggregation rule over accepted updates (of partitions ``clients``)."""
        return fedavg(states, weights)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = self._valid_sorted(replies, is_train=False)
        if not valid:
            return None
        fields = {
            "eval_loss": "eval-loss",
            "perplexity": "perplexity",
            "eval_loss_global": "eval-loss-global",
            "eval_loss_personal": "eval-loss-personal",
        }
        entries = [self._log(server_round, "evaluate", m, fields) for m in valid]
        weights = [e["num_examples"] for e in entries]
        return MetricRecord(
            {
                "eval-loss": weighted_mean([e["eval_loss"] for e in entries], weights),
                "num-clients": len(valid),
            }
        )

    # -- server state (for exact resume) -------------------------------------------
    def server_state(self) -> Arrays:
        """Optimiser state to checkpoint with the round ({} for stateless strategies)."""
        out: Arrays = {}
        for name in ("m_t", "v_t"):
            for key, value in (getattr(self, name, None) or {}).items():
                out[f"{name}/{key}"] = np.asarray(value)
        momentum = getattr(self, "momentum_vector", None)
        if momentum is not None:
            keys = list(next(iter(self._references.values()), {}))
            out.update({f"momentum/{k}": np.asarray(v) for k, v in zip(keys, momentum, strict=True)})
        return out

    def load_server_state(self, state: Arrays, current: Arrays) -> None:
        """Restore :meth:`server_state` output; ``current`` is the global adapter it goes with."""
        for name in ("m_t", "v_t"):
            part = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}/")}
            if part:
                setattr(self, name, part)
        momentum = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("momentum/")}
        if momentum:
            self.momentum_vector = [momentum[k] for k in current]


def _register(name: str, cls: type[AdapterStrategy], kwargs: Callable[[Config], dict[str, Any]]) -> None:
    STRATEGIES.add(name, kwargs)
    _CLASSES[name] = cls


def _opt(cfg: Config, *names: str) -> dict[str, Any]:
    """Server-optimiser settings ``names``: the config's value where set, else Flower's default."""
    fed = cfg.fed
    given = {"eta": fed.server_lr, "beta_1": fed.beta_1, "beta_2": fed.beta_2, "tau": fed.tau}
    return {k: v for k, v in given.items() if k in names and v is not None}


class AdapterFedAvg(AdapterStrategy):
    """Plain FedAvg (McMahan et al.)."""


class AdapterFedProx(FedProx, AdapterStrategy):
    """FedAvg + a proximal term ``mu/2 ||w - w_global||^2`` in every client's loss."""


class AdapterFedAvgM(FedAvgM, AdapterStrategy):  # type: ignore[misc]
    """FedAvg with server learning rate and momentum on the pseudo-gradient."""


class AdapterFedAdam(FedAdam, AdapterStrategy):
    """Adaptive server optimiser (Reddi et al.): Adam on the pseudo-gradient."""


class AdapterFedYogi(FedYogi, AdapterStrategy):
    """Adaptive server optimiser: Yogi on the pseudo-gradient."""


class AdapterFedAdagrad(FedAdagrad, AdapterStrategy):
    """Adaptive server optimiser: Adagrad on the pseudo-gradient."""


class AdapterMedian(AdapterStrategy):
    """Coordinate-wise median of the accepted updates (Flower's ``aggregate_median``)."""

    def aggregate_states(self, states: list[Arrays], weights: list[int], clients: list[int]) -> Arrays:
        keys = list(states[0])
        out = aggregate_median([([s[k] for k in keys], w) for s, w in zip(states, weights, strict=True)])
        return {k: np.asarray(v, dtype=np.float32) for k, v in zip(keys, out, strict=True)}


class AdapterTrimmedMean(AdapterStrategy):
    """Coordinate-wise trimmed mean (Flower's ``aggregate_trimmed_avg``); ``fed.trim_fraction`` per side."""

    def aggregate_states(self, states: list[Arrays], weights: list[int], clients: list[int]) -> Arrays:
        keys = list(states[0])
        results = [([s[k] for k in keys], w) for s, w in zip(states, weights, strict=True)]
        out = aggregate_trimmed_avg(results, self.cfg.fed.trim_fraction)
        return {k: np.asarray(v, dtype=np.float32) for k, v in zip(keys, out, strict=True)}


class AdapterKrum(AdapterStrategy):
    """Krum (Flower's ``aggregate_krum``): the update closest to its n - f - 2 neighbours."""

    def aggregate_states(self, states: list[Arrays], weights: list[int], clients: list[int]) -> Arrays:
        keys = list(states[0])
        results = [([s[k] for k in keys], w) for s, w in zip(states, weights, strict=True)]
        out = aggregate_krum(results, num_malicious=self.cfg.fed.krum_malicious, to_keep=0)
        return {k: np.asarray(v, dtype=np.float32) for k, v in zip(keys, out, strict=True)}


_register("fedavg", AdapterFedAvg, lambda cfg: {})
_register("fedprox", AdapterFedProx, lambda cfg: {"proximal_mu": cfg.fed.proximal_mu})
_register(
    "fedavgm",
    AdapterFedAvgM,
    lambda cfg: {
        "server_learning_rate": cfg.fed.server_lr or 1.0,
        "server_momentum": cfg.fed.server_momentum,
    },
)
_register("fedadam", AdapterFedAdam, lambda cfg: _opt(cfg, "eta", "beta_1", "beta_2", "tau"))
_register("fedyogi", AdapterFedYogi, lambda cfg: _opt(cfg, "eta", "beta_1", "beta_2", "tau"))
_register("fedadagrad", AdapterFedAdagrad, lambda cfg: _opt(cfg, "eta", "tau"))
_register("median", AdapterMedian, lambda cfg: {})
_register("trimmed-mean", AdapterTrimmedMean, lambda cfg: {})
_register("krum", AdapterKrum, lambda cfg: {})


def strategy_class(cfg: Config) -> type[AdapterStrategy]:
    """The class named by ``fed.strategy``; checks that it fits ``model.lora.ranks``."""
    from fedtune.federated.hetero_strategies import HeteroStrategy

    STRATEGIES.get(cfg.fed.strategy, where="fed.strategy")
    cls = _CLASSES[cfg.fed.strategy]
    if issubclass(cls, HeteroStrategy):
        rank_rule(cfg.model.lora.ranks or [cfg.model.lora.r] * cfg.partition.num_partitions,
                  cfg.partition.num_partitions)  # fmt: skip
    elif cfg.model.lora.ranks is not None:
        raise FedtuneError(
            "model.lora.ranks: per-client ranks need fed.strategy 'stack' or 'zero-pad', "
            f"not {cfg.fed.strategy!r}"
        )
    return cls


def build_strategy(cfg: Config, clients: dict[int, int]) -> AdapterStrategy:
    """The strategy named by ``fed.strategy``, with the run's sampling settings."""
    cls = strategy_class(cfg)
    extra = STRATEGIES.get(cfg.fed.strategy)(cfg)
    strategy = cls(
        fraction_train=cfg.fed.fraction_train,
        fraction_evaluate=cfg.fed.fraction_evaluate,
        min_train_nodes=cfg.fed.min_train_clients,
        min_evaluate_nodes=cfg.fed.min_evaluate_clients,
        min_available_nodes=len(clients),
        **extra,
    )
    return strategy.bind(cfg, clients)


class FFLoraStrategy(AdapterStrategy):
    """FF-LoRA: FedAvg over a global adapter; every client also trains a personal adapter
    that never leaves it, and uses the two fused (summed) for training and inference.

    Clients report held-out loss for the fused model (``eval_loss``) and for the global
    and personal adapters alone (``eval_loss_global``, ``eval_loss_personal``).
    """

    def client_payload(
        self, pid: int, global_state: Arrays, message_type: str, server_round: int
    ) -> tuple[dict[str, ArrayRecord], dict[str, Any], Arrays]:
        records, extra, reference = super().client_payload(pid, global_state, message_type, server_round)
        lora = self.cfg.model.lora
        extra = {**extra, "personal-rank": lora.personal_r or lora.r}
        if self.run_dir:  # (Flower cannot count an empty string's bytes)
            extra["run-dir"] = self.run_dir
        return records, extra, reference


_register("fflora", FFLoraStrategy, lambda cfg: {})


# The heterogeneous-rank strategies and SCAFFOLD register themselves on import; keep them in the registry
# wherever this module is used (placed last: that module imports from this one).
from fedtune.federated import hetero_strategies as _hetero  # noqa: E402, F401
from fedtune.federated import scaffold as _scaffold  # noqa: E402, F401
