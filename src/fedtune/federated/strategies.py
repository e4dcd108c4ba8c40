"""Flower strategies over LoRA adapters: thin subclasses that call the pure maths.

``AdapterFedAvg`` is Flower's FedAvg with three changes an LLM run needs:
clients are sampled by partition id from a seeded RNG (node ids are random per
run, so Flower's own sampling could not be resumed exactly); replies are
aggregated in partition order by :func:`fedtune.federated.aggregate.fedavg`
(float64, reply-order independent); and the adapter is cast to the wire dtype on
the way down while the server keeps float32. Per-client metrics and payload
bytes of every message are collected in ``round_log`` for ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.config import Config
from fedtune.federated.aggregate import fedavg, weighted_mean
from fedtune.federated.records import from_record, to_record
from fedtune.registry import Registry

log = logging.getLogger(__name__)

STRATEGIES: Registry[Callable[..., AdapterFedAvg]] = Registry("strategy")


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


@STRATEGIES.register("fedavg")
class AdapterFedAvg(FedAvg):
    """FedAvg over adapter state dicts, weighted by each client's training examples."""

    def __init__(self, cfg: Config, clients: dict[int, int]) -> None:
        super().__init__(
            fraction_train=cfg.fed.fraction_train,
            fraction_evaluate=cfg.fed.fraction_evaluate,
            min_train_nodes=cfg.fed.min_train_clients,
            min_evaluate_nodes=cfg.fed.min_evaluate_clients,
            min_available_nodes=len(clients),
        )
        self.cfg = cfg
        self.config_text = cfg.to_toml()
        self.node_of = {pid: node for node, pid in clients.items()}  # partition id -> node id
        self.round_log: list[dict[str, Any]] = []
        self._sent: dict[int, int] = {}  # node id -> bytes sent this phase

    # -- sending ------------------------------------------------------------------
    def _messages(
        self, server_round: int, arrays: ArrayRecord | None, message_type: str, fraction: float, minimum: int
    ) -> list[Message]:
        if fraction == 0.0:
            return []
        chosen = sample_clients(self.node_of, fraction, minimum, self.cfg.seed, server_round)
        config = ConfigRecord({"server-round": server_round, "fedtune-config": self.config_text})
        content: dict[str, Any] = {"config": config}
        if arrays is not None:
            content["arrays"] = to_record(from_record(arrays), self.cfg.fed.wire_dtype)
        record = RecordDict(content)
        size = payload_bytes(record)
        messages = []
        for pid in chosen:
            node = self.node_of[pid]
            self._sent[node] = size
            messages.append(Message(content=record, message_type=message_type, dst_node_id=node))
        log.debug("round %s %s: clients %s", server_round, message_type, chosen)
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(
            server_round, arrays, MessageType.TRAIN, self.fraction_train, self.min_train_nodes
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(
            server_round, arrays, MessageType.EVALUATE, self.fraction_evaluate, self.min_evaluate_nodes
        )

    # -- receiving ----------------------------------------------------------------
    def _valid_sorted(self, replies: Iterable[Message], is_train: bool) -> list[Message]:
        valid, errors = self._check_and_log_replies(replies, is_train=is_train)
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
            entry[out_key] = float(metrics[in_key])  # type: ignore[arg-type]
        self.round_log.append(entry)
        return entry

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self._valid_sorted(replies, is_train=True)
        if not valid:
            return None, None
        fields = {"train_loss": "train-loss", "first_step_at": "first-step-at"}
        entries = [self._log(server_round, "train", m, fields) for m in valid]
        weights = [e["num_examples"] for e in entries]
        states = [from_record(m.content["arrays"]) for m in valid]  # type: ignore[arg-type]
        merged = self.aggregate_states(states, weights)
        metrics = MetricRecord(
            {
                "train-loss": weighted_mean([e["train_loss"] for e in entries], weights),
                "num-clients": len(valid),
            }
        )
        return to_record(merged, "float32"), metrics

    def aggregate_states(
        self, states: list[dict[str, np.ndarray]], weights: list[int]
    ) -> dict[str, np.ndarray]:
        """The aggregation rule; subclasses replace this (robust, stacking, ...)."""
        return fedavg(states, weights)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        valid = self._valid_sorted(replies, is_train=False)
        if not valid:
            return None
        fields = {"eval_loss": "eval-loss", "perplexity": "perplexity"}
        entries = [self._log(server_round, "evaluate", m, fields) for m in valid]
        weights = [e["num_examples"] for e in entries]
        return MetricRecord(
            {
                "eval-loss": weighted_mean([e["eval_loss"] for e in entries], weights),
                "num-clients": len(valid),
            }
        )
