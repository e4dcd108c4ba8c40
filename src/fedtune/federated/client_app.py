"""Flower ClientApp: receive the global adapter, train or evaluate locally, reply.

Every message carries the run's resolved config (``fedtune-config``), so the client
needs nothing but its node config: ``partition-id`` and ``num-partitions`` (set by the
simulation runtime, or ``--node-config`` on a SuperNode), and optionally ``data-path``,
a file of the client's own that replaces the partition of the shared source.

The base model is loaded once per process and only the adapter weights are swapped
per message. In simulation Ray workers live for the whole run, so that cache saves a
model load per client per round; in deployment the SuperNode starts a fresh process
per message and the cache cannot help (see README, "Deployment").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import datasets
import torch
import transformers
from datasets import Dataset
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedtune.config import Config, ModelConfig, config_from_toml_text
from fedtune.data.pipeline import client_tokenized
from fedtune.federated import stack_cache
from fedtune.federated.personal import load_personal, save_personal, state_root
from fedtune.federated.records import from_record, to_record, to_torch
from fedtune.models.adapters import (
    activate,
    adapter_state,
    attach_lora,
    ensure_adapter,
    load_adapter_state,
    parameter_names,
    reset_adapter,
)
from fedtune.models.load import load_model, load_tokenizer
from fedtune.training.local import EvalResult, TrainResult, evaluate, train
from fedtune.training.schedule import at_round

log = logging.getLogger(__name__)
app = ClientApp()

# Worker processes print to the driver's terminal: keep per-dataset bars out of it.
datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()

CONFIG_KEY = "fedtune-config"


@dataclass
class Runtime:
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase


@lru_cache(maxsize=1)
def _runtime(model_json: str) -> Runtime:
    cfg = ModelConfig.model_validate_json(model_json)
    tokenizer = _tokenizer(model_json)
    model = attach_lora(load_model(cfg), cfg.lora)
    model.eval()
    log.info("Loaded base model %s in this process", cfg.name)
    return Runtime(model=model, tokenizer=tokenizer)


@lru_cache(maxsize=1)
def _tokenizer(model_json: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(ModelConfig.model_validate_json(model_json))


@lru_cache(maxsize=32)
def _data(config_text: str, partition_id: int, data_path: str | None) -> tuple[Dataset, Dataset]:
    cfg = config_from_toml_text(config_text, source="message config")
    tokenizer = _tokenizer(cfg.model.model_dump_json())
    return client_tokenized(cfg, tokenizer, partition_id, data_path=data_path)


def _node(context: Context) -> tuple[int, str | None]:
    node = context.node_config
    if "partition-id" not in node:
        raise ValueError("node config lacks 'partition-id' (SuperNode --node-config \"partition-id=0 ...\")")
    data_path = node.get("data-path")
    return int(node["partition-id"]), (str(data_path) if data_path else None)


def _message_config(msg: Message) -> tuple[Config, str]:
    config: ConfigRecord = msg.content["config"]  # type: ignore[assignment]
    text = str(config[CONFIG_KEY])
    # the round's learning rate under fed.lr_schedule (SCAFFOLD's server uses the same)
    cfg = at_round(config_from_toml_text(text, source="message config"), int(config["server-round"]))  # type: ignore[arg-type]
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    return cfg, text


def _setup(cfg: Config, context: Context) -> tuple[Runtime, int, str | None]:
    partition_id, data_path = _node(context)
    runtime = _runtime(cfg.model.model_dump_json())
    return runtime, partition_id, data_path


def _install(model: PeftModel, msg: Message, cfg: Config, context: Context, pid: int) -> str:
    """Load the message's adapter(s) into the model; returns the adapter that trains.

    Plain strategies send the global adapter ("default"). Heterogeneous-rank ones send
    the client's own rank-``rank`` adapter, optionally on top of a frozen global update
    (``frozen``, rank ``frozen-rank``, scaling 1), and for evaluation the global
    adapter alone (``global-rank``, scaling 1). FLoRA's merge mode may send either stack as
    the part beyond what this client holds (``<key>-from``, see :mod:`stack_cache`).
    """
    config: ConfigRecord = msg.content["config"]  # type: ignore[assignment]
    lora = cfg.model.lora

    def received(key: str) -> dict[str, torch.Tensor]:
        sent = to_torch(from_record(msg.content[key])) if key in msg.content else None  # type: ignore[arg-type]
        if f"{key}-from" not in config:
            if sent is None:
                raise KeyError(key)
            return sent
        node_dir = context.node_config.get("state-dir")
        root = state_root(str(node_dir) if node_dir else None, str(config.get("run-dir", "")))
        held = int(config[f"{key}-from"])  # type: ignore[arg-type]
        return stack_cache.receive(sent, held or None, root, pid)

    def put(name: str, key: str, rank: int | None, alpha: float | None = None) -> str:
        if rank is not None:  # scaling 1 for the global (alpha = r); the client's own alpha otherwise
            spec = lora.model_copy(update={"r": rank, "alpha": alpha or rank, "ranks": None})
            ensure_adapter(model, name, spec if alpha else spec.model_copy(update={"dropout": 0.0}))
        load_adapter_state(model, received(key), name)
        return name

    if "personal-rank" in config:  # FF-LoRA: global ("default") + personal, fused
        put("default", "arrays", None)
        personal = lora.model_copy(update={"r": int(config["personal-rank"]), "ranks": None})  # type: ignore[arg-type]
        ensure_adapter(model, "personal", personal)
        activate(model, ["default", "personal"], trainable=["default", "personal"])
        return "default"
    if "global-rank" in config:
        activate(model, [put("global", "arrays", int(config["global-rank"]))], trainable=None)  # type: ignore[arg-type]
        return "global"
    if "rank" in config:
        rank = int(config["rank"])  # type: ignore[arg-type]
        own = put(f"r{rank}", "arrays", rank, lora.alpha)
        names = [own]
        if "frozen-rank" in config:
            names.insert(0, put("global", "frozen", int(config["frozen-rank"])))  # type: ignore[arg-type]
        activate(model, names, trainable=own)
        return own
    activate(model, [put("default", "arrays", None)], trainable="default")
    return "default"


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Distinct, reproducible randomness per (run seed, round, client)."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**31)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server who this client is and how much data it holds."""
    _, text = _message_config(msg)
    partition_id, data_path = _node(context)
    train_ds, test_ds = _data(text, partition_id, data_path)
    metrics = MetricRecord(
        {"partition-id": partition_id, "num-train": len(train_ds), "num-test": len(test_ds)}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _personal(
    runtime: Runtime, cfg: Config, config: ConfigRecord, context: Context, pid: int, *, trained: bool
) -> Path | None:
    """FF-LoRA: load this client's personal adapter from its own disk (fresh if none yet).

    Training in round N starts from the one saved after round N-1; evaluating round N
    (``trained``) uses the one saved after round N itself.
    """
    if "personal-rank" not in config:
        return None
    node_dir = context.node_config.get("state-dir")
    root = state_root(str(node_dir) if node_dir else None, str(config.get("run-dir", "")))
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    state = load_personal(root, pid, before_round=server_round + int(trained))
    if state is None:  # seeded A, zero B: the fused model starts as the global one
        reset_adapter(runtime.model, "personal", seed=client_seed(cfg.seed, 0, pid))
    else:
        load_adapter_state(runtime.model, state, "personal")
    return root


def _train_reply(
    msg: Message,
    arrays: ArrayRecord,
    result: TrainResult,
    partition_id: int,
    start: float,
    lr: float,
    extra: Mapping[str, float] | None = None,
) -> Message:
    """The reply to a train message: the adapter record and the round's training metrics."""
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "steps": result.steps,
            "first-step-at": result.first_step_at,
            "partition-id": partition_id,
            "lr": lr,
            "seconds": time.perf_counter() - start,
            **(extra or {}),
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _train_split(msg: Message, context: Context, cfg: Config, text: str, start: float) -> Message:
    from fedtune.federated.split_client import split_train

    config: ConfigRecord = msg.content["config"]  # type: ignore[assignment]
    partition_id, data_path = _node(context)
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    tokenizer = _tokenizer(cfg.model.model_dump_json())
    train_ds, _ = _data(text, partition_id, data_path)
    seed = client_seed(cfg.seed, server_round, partition_id)
    proximal_mu = float(config.get("proximal-mu", 0.0))  # type: ignore[arg-type]
    result, arrays, traffic = split_train(
        cfg, msg, partition_id, train_ds, tokenizer, seed=seed, proximal_mu=proximal_mu
    )
    return _train_reply(msg, arrays, result, partition_id, start, cfg.train.lr, traffic)


def _evaluate_split(msg: Message, context: Context, cfg: Config, text: str, start: float) -> Message:
    from fedtune.federated.split_client import split_evaluate

    partition_id, data_path = _node(context)
    tokenizer = _tokenizer(cfg.model.model_dump_json())
    _, test_ds = _data(text, partition_id, data_path)
    config: ConfigRecord = msg.content["config"]  # type: ignore[assignment]
    seed = client_seed(cfg.seed, int(config["server-round"]), partition_id) + 1  # type: ignore[arg-type]
    result = split_evaluate(cfg, msg, partition_id, test_ds, tokenizer, seed=seed)
    return Message(RecordDict({"metrics": _eval_metrics(result, partition_id, start, {})}), reply_to=msg)


def _eval_metrics(
    result: EvalResult, partition_id: int, start: float, extra: dict[str, float]
) -> MetricRecord:
    return MetricRecord(
        {
            **extra,
            "num-examples": result.num_examples,
            "eval-loss": result.loss,
            "perplexity": result.perplexity,
            "num-tokens": result.num_tokens,
            "partition-id": partition_id,
            "seconds": time.perf_counter() - start,
        }
    )


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    cfg, text = _message_config(msg)
    if cfg.split.enabled:
        return _train_split(msg, context, cfg, text, start)
    runtime, partition_id, data_path = _setup(cfg, context)
    config: ConfigRecord = msg.content["config"]  # type: ignore[assignment]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    proximal_mu = float(config.get("proximal-mu", 0.0))  # type: ignore[arg-type]  # set by FedProx
    adapter = _install(runtime.model, msg, cfg, context, partition_id)
    personal = _personal(runtime, cfg, config, context, partition_id, trained=False)
    correction = None
    if "correction" in msg.content:  # SCAFFOLD: c - c_i, added to the adapter's gradients
        values = to_torch(from_record(msg.content["correction"]))  # type: ignore[arg-type]
        correction = {parameter_names(values, adapter)[k]: v for k, v in values.items()}
    train_ds, _ = _data(text, partition_id, data_path)
    result = train(
        runtime.model,
        train_ds,
        runtime.tokenizer,
        cfg.train,
        seed=client_seed(cfg.seed, server_round, partition_id),
        proximal_mu=proximal_mu,
        correction=correction,
    )
    arrays: ArrayRecord = to_record(adapter_state(runtime.model, adapter), cfg.fed.wire_dtype)
    if personal is not None:  # stays on this client
        lora = cfg.model.lora.model_copy(update={"r": int(config["personal-rank"]), "ranks": None})  # type: ignore[arg-type]
        state = adapter_state(runtime.model, "personal")
        save_personal(state, lora, cfg.model, personal, partition_id, server_round)
    return _train_reply(msg, arrays, result, partition_id, start, cfg.train.lr)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    cfg, text = _message_config(msg)
    if cfg.split.enabled:
        return _evaluate_split(msg, context, cfg, text, start)
    runtime, partition_id, data_path = _setup(cfg, context)
    _install(runtime.model, msg, cfg, context, partition_id)
    config: ConfigRecord = msg.content["config"]  # type: ignore[assignment]
    _, test_ds = _data(text, partition_id, data_path)
    extra: dict[str, float] = {}
    if _personal(runtime, cfg, config, context, partition_id, trained=True) is not None:
        # the personal adapter after the round just trained: evaluate it alone and the global alone
        for name in ("default", "personal"):
            activate(runtime.model, [name], trainable=None)
            loss = evaluate(runtime.model, test_ds, runtime.tokenizer, cfg.train.eval_batch_size).loss
            extra["eval-loss-global" if name == "default" else "eval-loss-personal"] = loss
        activate(runtime.model, ["default", "personal"], trainable=None)
    result = evaluate(runtime.model, test_ds, runtime.tokenizer, cfg.train.eval_batch_size)
    return Message(RecordDict({"metrics": _eval_metrics(result, partition_id, start, extra)}), reply_to=msg)
