"""One client message's work: the parsed instruction, who the client is, its data and replies.

Shared by the ClientApp's handlers (:mod:`~fedtune.federated.client_app`) and the split path
(:mod:`~fedtune.federated.split_client`). Caches key on the frozen config sections.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from flwr.app import ArrayRecord, Context, Message
from transformers import PreTrainedTokenizerBase

from fedtune.config import Config, ModelConfig
from fedtune.data.pipeline import client_tokenized
from fedtune.federated.personal import state_root
from fedtune.federated.protocol import EvaluateReply, Instruction, TrainReply, read_instruction
from fedtune.federated.records import blockwise
from fedtune.models.load import load_tokenizer
from fedtune.training.local import EvalResult, TrainResult
from fedtune.training.schedule import at_round

_DEFAULT_THREADS = torch.get_num_threads()  # this process's own, before any run set it


@lru_cache(maxsize=1)
def tokenizer_for(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, loaded once per process."""
    return load_tokenizer(model_cfg)


@dataclass(frozen=True)
class NodeData:
    """Where a client's data comes from, from its SuperNode's ``node-config``.

    ``partition-id``; ``data-path`` (its own file instead of a partition of the shared
    source); ``state-dir`` (where it keeps state and the indexes it builds); ``rag.case_base``
    (its own case-base file, folder or index, instead of its training records);
    ``rag.share_case_base`` (the owner's word on case queries, over the run config's).
    """

    partition_id: int
    data_path: str | None = None
    state_dir: str | None = None
    case_base: str | None = None
    share_case_base: bool | None = None


def client_data(cfg: Config, node: NodeData) -> tuple[Dataset, Dataset]:
    """A client's tokenized (train, test) split, cached per (config, node, its data file's version).

    A long-lived process (a node worker) must not train on a stale copy of a file that changed.
    """
    stamp = None
    if node.data_path and (path := Path(node.data_path)).exists():
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
    return _client_data(cfg, node, stamp)


@lru_cache(maxsize=32)
def _client_data(cfg: Config, node: NodeData, stamp: tuple[int, int] | None) -> tuple[Dataset, Dataset]:
    return client_tokenized(
        cfg,
        tokenizer_for(cfg.model),
        node.partition_id,
        data_path=node.data_path,
        state_dir=node.state_dir,
        case_base=node.case_base,
    )


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Distinct, reproducible randomness per (run seed, round, client)."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**31)


@dataclass(frozen=True)
class Task:
    """One message's work: the instruction (parsed once) and who this client is."""

    inst: Instruction
    cfg: Config  # the instruction's config at this round's learning rate (fed.lr_schedule)
    node: NodeData
    state_dir: Path  # where this client keeps state between rounds
    start: float

    @property
    def partition_id(self) -> int:
        return self.node.partition_id

    def data(self) -> tuple[Dataset, Dataset]:
        return client_data(self.inst.config, self.node)

    def seed(self) -> int:
        return client_seed(self.cfg.seed, self.inst.server_round, self.partition_id)


def _optional(node: dict[str, Any], key: str) -> str | None:
    value = node.get(key)
    return str(value) if value else None


def node_identity(context: Context) -> NodeData:
    """The SuperNode's data settings (:class:`NodeData`) from its ``node-config``."""
    node = dict(context.node_config)
    if "partition-id" not in node:
        raise ValueError("node config lacks 'partition-id' (SuperNode --node-config \"partition-id=0 ...\")")
    return NodeData(
        int(node["partition-id"]),
        _optional(node, "data-path"),
        _optional(node, "state-dir"),
        _optional(node, "rag.case_base"),
        _flag(node.get("rag.share_case_base")),
    )


def _flag(value: Any) -> bool | None:
    """A node-config switch: a bool, or ``true``/``false`` as text; None when unset."""
    if value is None or isinstance(value, bool):
        return value
    if str(value).lower() not in ("true", "false"):
        raise ValueError(f"node config 'rag.share_case_base' must be true or false, got {value!r}")
    return str(value).lower() == "true"


def make_task(msg: Message, context: Context) -> Task:
    """A train/evaluate message as a Task (its config at the round's lr); sets torch's thread count."""
    start = time.perf_counter()
    inst = read_instruction(msg)
    cfg = at_round(inst.config, inst.server_round)  # the round's lr; SCAFFOLD's server reads it back
    torch.set_num_threads(cfg.train.num_threads or _DEFAULT_THREADS)  # unset: as a fresh process
    node = node_identity(context)
    root = state_root(node.state_dir, inst.run_dir or "")
    return Task(inst, cfg, node, root, start)


def reply_dtype(task: Task) -> str:
    """The dtype a trained adapter is encoded in: ``fed.wire_dtype``, or float32 under DP.

    Under client-level DP the update is clipped on it, so it must not be rounded to the wire
    dtype first; under SecAgg+ the adapter never leaves (Flower's mod quantises the update), so
    a blockwise format would only round it twice.
    """
    wire = task.cfg.fed.wire_dtype
    if task.inst.clip_norm is not None or (task.inst.secagg and blockwise(wire)):
        return "float32"
    return wire


def delta_coded(task: Task) -> bool:
    """True when the trained adapter is sent as the update (trained - sent): blockwise formats."""
    return blockwise(reply_dtype(task))


def train_reply(task: Task, arrays: ArrayRecord, result: TrainResult, **extra: Any) -> TrainReply:
    """The reply to a train instruction: the adapter and the round's training metrics."""
    return TrainReply(
        partition_id=task.partition_id,
        num_examples=result.num_examples,
        adapter=arrays,
        train_loss=result.loss,
        steps=result.steps,
        lr=task.cfg.train.lr,
        first_step_at=result.first_step_at,
        seconds=time.perf_counter() - task.start,
        delta=1 if delta_coded(task) else None,
        **extra,
    )


def evaluate_reply(task: Task, result: EvalResult, **extra: float) -> EvaluateReply:
    """The reply to an evaluate instruction: the held-out loss, perplexity and token count."""
    return EvaluateReply(
        partition_id=task.partition_id,
        num_examples=result.num_examples,
        eval_loss=result.loss,
        perplexity=result.perplexity,
        num_tokens=result.num_tokens,
        seconds=time.perf_counter() - task.start,
        **extra,
    )
