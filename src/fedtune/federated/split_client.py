"""The ClientApp's split-learning path: train and evaluate head + tail against the trunk service.

A split client holds the embeddings, the first ``split.n_head`` and last ``split.n_tail`` blocks,
the final norm and the head; Flower brings it the global head + tail adapter and the trunk
services' addresses (``trunk-addresses``; client ``partition_id % len`` uses that one). Within the
round it streams activations to the service and trains with the ordinary local loop
(:func:`~fedtune.training.local.train` over a :class:`~fedtune.split.lm.SplitLM`), with
``split.protect`` noise and clipping on what it sends. It replies with its head + tail adapter,
never with the trunk's, and with how many bytes crossed the cut.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from fedtune.config import Config, ModelConfig, SplitConfig
from fedtune.federated.protocol import EvaluateReply, TrainReply
from fedtune.federated.records import from_record, to_torch
from fedtune.federated.task import Task, evaluate_reply, tokenizer_for, train_reply
from fedtune.federated.uplink import encode_reply
from fedtune.split.client import RemoteTrunk, TrunkClient
from fedtune.split.host import trunk_address
from fedtune.split.lm import SplitLM, parts_from_config
from fedtune.split.partition_model import Head, Tail, client_adapter_state_dict
from fedtune.split.protect import ProtectConfig, Protection, protect_parts
from fedtune.training.local import evaluate, train

log = logging.getLogger(__name__)


@dataclass
class SplitRuntime:
    head: Head
    tail: Tail


@lru_cache(maxsize=1)
def _runtime(model: ModelConfig, split: SplitConfig, seed: int) -> SplitRuntime:
    cfg = Config(model=model, split=split, seed=seed)
    parts = parts_from_config(cfg, client_only=True)
    log.info("Loaded head + tail of %s in this process", cfg.model.name)
    return SplitRuntime(head=parts.head, tail=parts.tail)


def split_runtime(cfg: Config) -> SplitRuntime:
    """The process's head + tail for ``cfg``'s model and cut, loaded once and kept."""
    return _runtime(cfg.model, cfg.split, cfg.seed)


def _connect(cfg: Config, addresses: tuple[str, ...], partition_id: int, hidden_size: int) -> TrunkClient:
    split = cfg.split
    return TrunkClient(
        trunk_address(addresses, partition_id),
        hidden_size,
        tls_root_cert=split.tls_root_cert,
        max_message_bytes=int(split.max_message_mib * 2**20),
        timeout_s=split.timeout_s,
    )


def _protection(cfg: Config, runtime: SplitRuntime, seed: int) -> Protection:
    p = cfg.split.protect
    config = ProtectConfig(
        p.activation_sigma,
        p.grad_clip_norm,
        p.grad_noise_multiplier,
        seed=seed,
        activation_scale=p.activation_scale,
    )
    return protect_parts(runtime.head, runtime.tail, config)


def split_train(task: Task) -> TrainReply:
    """One round of split training; replies with the head + tail adapter and the bytes that crossed."""
    cfg, seed = task.cfg, task.seed()
    train_ds, _ = task.data()
    with _global_split_model(task, seed) as (model, client):
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        result = train(
            model, train_ds, tokenizer_for(cfg.model), cfg.train, seed=seed, proximal_mu=task.inst.proximal_mu
        )
        traffic = {"trunk_bytes_up": float(client.bytes_up), "trunk_bytes_down": float(client.bytes_down)}
    arrays = encode_reply(task, client_adapter_state_dict(model.head, model.tail))
    return train_reply(task, arrays, result, **traffic)


@contextmanager
def _global_split_model(task: Task, seed: int) -> Iterator[tuple[SplitLM, TrunkClient]]:
    """The instruction's global head + tail around a connected, protected remote trunk."""
    runtime = split_runtime(task.cfg)
    assert task.inst.adapter is not None
    state = to_torch(from_record(task.inst.adapter))
    runtime.head.load_adapter_state_dict(state)
    runtime.tail.load_adapter_state_dict(state)
    addresses = task.inst.trunk_addresses
    with (
        _connect(task.cfg, addresses, task.partition_id, runtime.head.hidden_size) as client,
        _protection(task.cfg, runtime, seed),
    ):
        yield SplitLM(runtime.head, RemoteTrunk(client), runtime.tail), client


def split_evaluate(task: Task) -> EvaluateReply:
    """Held-out loss of the global head + tail around the (averaged) trunk."""
    _, test_ds = task.data()
    with _global_split_model(task, task.seed() + 1) as (model, _):
        result = evaluate(model, test_ds, tokenizer_for(task.cfg.model), task.cfg.train.eval_batch_size)
    return evaluate_reply(task, result)


__all__ = ["split_evaluate", "split_runtime", "split_train"]
