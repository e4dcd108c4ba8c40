"""One client message's work: the parsed instruction, who the client is, its data and replies.

Shared by the ClientApp's handlers (:mod:`~fedtune.federated.client_app`) and the split path
(:mod:`~fedtune.federated.split_client`). Caches key on the frozen config sections.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from datasets import Dataset
from flwr.app import ArrayRecord, Context, Message
from transformers import PreTrainedTokenizerBase

from fedtune.config import Config, ModelConfig
from fedtune.data.pipeline import client_tokenized
from fedtune.federated.personal import state_root
from fedtune.federated.protocol import EvaluateReply, Instruction, TrainReply, read_instruction
from fedtune.models.load import load_tokenizer
from fedtune.training.local import EvalResult, TrainResult
from fedtune.training.schedule import at_round


@lru_cache(maxsize=1)
def tokenizer_for(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, loaded once per process."""
    return load_tokenizer(model_cfg)


@lru_cache(maxsize=32)
def client_data(cfg: Config, partition_id: int, data_path: str | None) -> tuple[Dataset, Dataset]:
    """A client's tokenized (train, test) split, cached per (config, partition, file)."""
    return client_tokenized(cfg, tokenizer_for(cfg.model), partition_id, data_path=data_path)


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Distinct, reproducible randomness per (run seed, round, client)."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**31)


@dataclass(frozen=True)
class Task:
    """One message's work: the instruction (parsed once) and who this client is."""

    inst: Instruction
    cfg: Config  # the instruction's config at this round's learning rate (fed.lr_schedule)
    partition_id: int
    data_path: str | None
    state_dir: Path  # where this client keeps state between rounds
    start: float

    def data(self) -> tuple[Dataset, Dataset]:
        return client_data(self.inst.config, self.partition_id, self.data_path)

    def seed(self) -> int:
        return client_seed(self.cfg.seed, self.inst.server_round, self.partition_id)


def node_identity(context: Context) -> tuple[int, str | None]:
    """The SuperNode's ``partition-id`` and its own ``data-path`` (None: a partition of the shared source)."""
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("node config lacks 'partition-id' (SuperNode --node-config \"partition-id=0 ...\")")
    data_path = node.get("data-path")
    return int(node["partition-id"]), (str(data_path) if data_path else None)


def make_task(msg: Message, context: Context) -> Task:
    """A train/evaluate message as a Task (its config at the round's lr); sets torch's thread count."""
    start = time.perf_counter()
    inst = read_instruction(msg)
    cfg = at_round(inst.config, inst.server_round)  # the round's lr; SCAFFOLD's server reads it back
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    partition_id, data_path = node_identity(context)
    node_dir = context.node_config.get("state-dir")
    root = state_root(str(node_dir) if node_dir else None, inst.run_dir or "")
    return Task(inst, cfg, partition_id, data_path, root, start)


def train_reply(task: Task, arrays: ArrayRecord, result: TrainResult, **extra: float) -> TrainReply:
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
