"""The ClientApp's work: read the instruction, route it to the handler of its job, build the reply.

:mod:`~fedtune.federated.client_app` (the Flower ``ClientApp``) runs these handlers in its own
process, or forwards the message to a long-lived node worker (``fedtune node``,
:mod:`~fedtune.federated.node`) that runs the same handlers with the model and data kept warm.

Every instruction carries the run's resolved config (:mod:`~fedtune.federated.protocol`),
so the client needs nothing but its node config: ``partition-id`` and ``num-partitions``
(set by the simulation runtime, or ``--node-config`` on a SuperNode), optionally
``data-path``, a file of the client's own that replaces the partition of the shared
source, and ``state-dir``, where it keeps state between rounds (FF-LoRA, FLoRA's stack).

``case_query`` answers a federated case-base search (:mod:`~fedtune.federated.case_search`)
where ``rag.share_case_base`` allows it; ``query`` answers the discovery query.

The base model is loaded once per process and only the adapter weights are swapped per
message; the caches key on the frozen config sections themselves, so a process reloads the
model only when the model config changes. Ray workers (simulation) and node workers live
for many messages; a ``flwr-clientapp`` process without a worker serves one message.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch
import transformers
from flwr.app import ArrayRecord, Context, Message
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedtune.config import Config, ModelConfig
from fedtune.errors import FedtuneError
from fedtune.federated import stack_cache
from fedtune.federated.personal import load_personal, save_personal
from fedtune.federated.protocol import (
    CaseHits,
    CaseQuery,
    EvaluateReply,
    Job,
    ProtocolError,
    Query,
    QueryReply,
    TrainReply,
    reply_message,
)
from fedtune.federated.records import from_record, to_record, to_torch
from fedtune.federated.secagg_client import masked_reply
from fedtune.federated.task import (
    Task,
    client_data,
    client_seed,
    evaluate_reply,
    make_task,
    node_identity,
    tokenizer_for,
    train_reply,
)
from fedtune.federated.uplink import encode_reply
from fedtune.models.adapters import (
    activate,
    adapter_state,
    attach_lora,
    ensure_adapter,
    load_adapter_state,
    parameter_names,
    reset_adapter,
    sent_keys,
)
from fedtune.models.load import load_model
from fedtune.privacy.dpfedavg import privatise
from fedtune.rag.federated import search_own_cases
from fedtune.training.local import evaluate, planned_steps, train

if TYPE_CHECKING:
    from fedtune.privacy.local_dp import LocalDp

log = logging.getLogger(__name__)

# Worker processes print to the driver's terminal: keep per-dataset bars out of it.
datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()


@dataclass
class Runtime:
    """What a client process keeps across rounds: the base model with its LoRA adapter, the tokenizer."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase


@lru_cache(maxsize=1)
def _runtime(model_cfg: ModelConfig) -> Runtime:
    model = attach_lora(load_model(model_cfg), model_cfg.lora)
    model.eval()
    log.info("Loaded base model %s in this process", model_cfg.name)
    return Runtime(model=model, tokenizer=tokenizer_for(model_cfg))


# -- adapters ---------------------------------------------------------------------
def _received(task: Task, record: ArrayRecord | None, held: int | None) -> dict[str, torch.Tensor]:
    """An adapter from the instruction.

    FLoRA's merge mode may send only the part beyond the stack of rank ``held`` this client keeps
    (``held`` 0: the whole stack, cached).
    """
    sent = to_torch(from_record(record)) if record is not None else None
    if held is None:
        if sent is None:
            raise ValueError("instruction carries no adapter")
        return sent
    return stack_cache.receive(sent, held or None, task.state_dir, task.partition_id)


def _put(
    model: PeftModel,
    task: Task,
    name: str,
    state: dict[str, torch.Tensor],
    rank: int | None,
    alpha: float | None = None,
) -> str:
    if rank is not None:  # scaling 1 for a global (alpha = r); the client's own alpha otherwise
        lora = task.cfg.model.lora
        spec = lora.model_copy(update={"r": rank, "alpha": alpha or rank, "ranks": None})
        ensure_adapter(model, name, spec if alpha else spec.model_copy(update={"dropout": 0.0}))
    load_adapter_state(model, state, name)
    return name


def install(model: PeftModel, task: Task) -> str:
    """Load the instruction's adapter(s) into the model by its job; returns the one that trains.

    ``PLAIN``: the global adapter ("default"). ``FFLORA``: "default" + a "personal" adapter
    (filled by :func:`_personal`), fused. ``GLOBAL``: a mixed-rank global at scaling 1.
    ``RANKED``: the client's own rank-``rank`` adapter, optionally on top of a frozen global.
    """
    inst = task.inst
    adapter = _received(task, inst.adapter, inst.adapter_from)
    if inst.job is Job.FFLORA:
        _put(model, task, "default", adapter, None)
        ensure_adapter(
            model, "personal", task.cfg.model.lora.model_copy(update={"r": inst.rank, "ranks": None})
        )
        activate(model, ["default", "personal"], trainable=["default", "personal"])
        freeze_a(model, task)
        return "default"
    if inst.job is Job.GLOBAL:
        activate(model, [_put(model, task, "global", adapter, inst.rank)], trainable=None)
        return "global"
    if inst.job is Job.RANKED:
        assert inst.rank is not None
        own = _put(model, task, f"r{inst.rank}", adapter, inst.rank, task.cfg.model.lora.alpha)
        names = [own]
        if inst.frozen_rank is not None:
            frozen = _received(task, inst.frozen, inst.frozen_from)
            names.insert(0, _put(model, task, "global", frozen, inst.frozen_rank))
        activate(model, names, trainable=own)
        return own
    activate(model, [_put(model, task, "default", adapter, None)], trainable="default")
    freeze_a(model, task)
    return "default"


def freeze_a(model: PeftModel, task: Task) -> None:
    """FFA-LoRA (``model.lora.freeze_a``): the global adapter's A stays at its start, only B trains."""
    if task.cfg.model.lora.freeze_a:
        for name, param in model.named_parameters():
            if ".lora_A.default." in name:
                param.requires_grad = False


def sent_state(model: PeftModel, name: str, task: Task) -> dict[str, torch.Tensor]:
    """The trained adapter as it is sent: all of it, or only B under FFA-LoRA."""
    state = adapter_state(model, name)
    return {k: state[k] for k in sent_keys(state, task.cfg.model.lora)}


def _personal(runtime: Runtime, task: Task, *, trained: bool) -> None:
    """FF-LoRA: load this client's personal adapter from its own disk (fresh if none yet).

    Training in round N starts from the one saved after round N-1; evaluating round N
    (``trained``) uses the one saved after round N itself.
    """
    before = task.inst.server_round + int(trained)
    state = load_personal(task.state_dir, task.partition_id, before_round=before)
    if state is None:  # seeded A, zero B: the fused model starts as the global one
        reset_adapter(runtime.model, "personal", seed=client_seed(task.cfg.seed, 0, task.partition_id))
    else:
        load_adapter_state(runtime.model, state, "personal")


# -- handlers ---------------------------------------------------------------------
def train_adapter(task: Task) -> TrainReply:
    """PLAIN, RANKED and FFLORA training on the process's one peft model."""
    runtime = _runtime(task.cfg.model)
    name = install(runtime.model, task)
    if task.inst.job is Job.FFLORA:
        _personal(runtime, task, trained=False)
    correction = None
    if task.inst.correction is not None:  # SCAFFOLD: c - c_i, added to the adapter's gradients
        values = to_torch(from_record(task.inst.correction))
        correction = {parameter_names(values, name)[k]: v for k, v in values.items()}
    train_ds, _ = task.data()
    dp = _local_dp(task, len(train_ds))
    result = train(
        runtime.model,
        train_ds,
        runtime.tokenizer,
        task.cfg.train,
        seed=task.seed(),
        proximal_mu=task.inst.proximal_mu,
        correction=correction,
        dp=dp,
    )
    arrays = encode_reply(task, sent_state(runtime.model, name, task))
    if task.inst.job is Job.FFLORA:  # the personal adapter stays on this client
        lora = task.cfg.model.lora.model_copy(update={"r": task.inst.rank, "ranks": None})
        state = adapter_state(runtime.model, "personal")
        save_personal(state, lora, task.cfg.model, task.state_dir, task.partition_id, task.inst.server_round)
    if dp is not None:
        from fedtune.privacy.local_dp import local_epsilon

        return train_reply(task, arrays, result, local_epsilon=local_epsilon(dp, task.inst.server_round))
    return train_reply(task, arrays, result)


def _local_dp(task: Task, num_train: int) -> LocalDp | None:
    """``privacy.local_dp``: DP-SGD's plan, or None.

    Its sampling and noise are seeded from the OS (secret from the server). Imported only when
    enabled: opacus and dp-accounting cost 0.6 s per process.
    """
    if not task.cfg.privacy.local_dp.enabled:
        return None
    from fedtune.privacy.local_dp import local_dp_setup

    return local_dp_setup(task.cfg, num_train, planned_steps(task.cfg.train, num_train))


def evaluate_adapter(task: Task) -> EvaluateReply:
    """Held-out loss of the installed adapter(s); FF-LoRA also the global and personal alone."""
    runtime = _runtime(task.cfg.model)
    install(runtime.model, task)
    _, test_ds = task.data()
    batch = task.cfg.train.eval_batch_size
    extra: dict[str, float] = {}
    if task.inst.job is Job.FFLORA:  # the personal adapter after the round just trained
        _personal(runtime, task, trained=True)
        activate(runtime.model, ["default"], trainable=None)
        extra["eval_loss_global"] = evaluate(runtime.model, test_ds, runtime.tokenizer, batch).loss
        activate(runtime.model, ["personal"], trainable=None)
        extra["eval_loss_personal"] = evaluate(runtime.model, test_ds, runtime.tokenizer, batch).loss
        activate(runtime.model, ["default", "personal"], trainable=None)
    result = evaluate(runtime.model, test_ds, runtime.tokenizer, batch)
    return evaluate_reply(task, result, **extra)


def _split_train(task: Task) -> TrainReply:
    from fedtune.federated.split_client import split_train

    return split_train(task)


def _split_evaluate(task: Task) -> EvaluateReply:
    from fedtune.federated.split_client import split_evaluate

    return split_evaluate(task)


# the handler of each job; GLOBAL only evaluates
TRAIN = {
    Job.PLAIN: train_adapter,
    Job.RANKED: train_adapter,
    Job.FFLORA: train_adapter,
    Job.SPLIT: _split_train,
}
EVALUATE = {
    Job.PLAIN: evaluate_adapter,
    Job.GLOBAL: evaluate_adapter,
    Job.RANKED: evaluate_adapter,
    Job.FFLORA: evaluate_adapter,
    Job.SPLIT: _split_evaluate,
}


def query(msg: Message, context: Context) -> Message:
    """Tell the server who this client is and how much data it holds."""
    cfg = Query.from_content(msg.content, where="query").config
    node = node_identity(context)
    train_ds, test_ds = client_data(cfg, node)
    return reply_message(QueryReply(node.partition_id, len(train_ds), len(test_ds)), msg)


def case_query(msg: Message, context: Context) -> Message:
    """Federated case-base search (``query.case``): this client's top ``k`` case passages and their ranks.

    Only where ``rag.share_case_base`` allows it (the SuperNode's node config, else the query's
    config); otherwise a FedtuneError, which Flower returns as an error reply: it says why,
    never what the base holds.
    """
    query = CaseQuery.from_content(msg.content, where="case query").check()
    node = node_identity(context)
    shared = query.config.rag.share_case_base if node.share_case_base is None else node.share_case_base
    if not shared:
        raise FedtuneError(f"partition {node.partition_id}: rag.share_case_base is off, case base not shared")
    hits = search_own_cases(
        query.config,
        node.partition_id,
        query.question,
        query.k,
        data_path=node.data_path,
        state_dir=node.state_dir,
        source=node.case_base,
    )
    reply = CaseHits(
        partition_id=node.partition_id,
        texts=tuple(h.passage.text for h in hits),
        ids=tuple(h.passage.id for h in hits),
        sources=tuple(h.passage.source for h in hits),
        ranks=tuple(h.rank for h in hits),
    )
    return reply_message(reply, msg)


def privatised(task: Task, reply: TrainReply) -> TrainReply:
    """Client-level DP: the update clipped to the instruction's norm (+ this client's noise share).

    The trained adapter comes in float32 (``reply_dtype``) and is sent so, so the server sees
    exactly the clipped update. The noise share is drawn
    from the OS's entropy: nobody, not even this client later, can subtract it.
    """
    assert task.inst.clip_norm is not None and task.inst.adapter is not None
    start = from_record(task.inst.adapter)
    std = task.inst.noise_std
    state, within = privatise(
        from_record(reply.adapter), start, task.inst.clip_norm, std, np.random.default_rng() if std else None
    )
    return dataclasses.replace(reply, adapter=to_record(state, "float32"), unclipped=int(within))


def train_handler(msg: Message, context: Context) -> Message:
    """Run the instruction's training job on this client's data; reply with the adapter and metrics."""
    task = make_task(msg, context)
    if task.inst.job not in TRAIN:
        raise ProtocolError(f"train instruction: job {task.inst.job.value!r} does not train")
    reply = TRAIN[task.inst.job](task)
    if task.inst.clip_norm is not None:  # nothing unclipped leaves under DP
        reply = privatised(task, reply)
    if task.inst.secagg:  # only the update, masked by the mod, and the scalars leave
        return masked_reply(task, reply, msg)
    return reply_message(reply, msg)


def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the instruction's adapter on this client's held-out data; reply with loss and perplexity."""
    task = make_task(msg, context)
    return reply_message(EVALUATE[task.inst.job](task), msg)


HANDLERS = {"query": query, "query.case": case_query, "train": train_handler, "evaluate": evaluate_handler}


def handle(handler: str, msg: Message, context: Context) -> Message:
    """Run ``handler`` (a key of :data:`HANDLERS`) on ``msg``: the reply, or the handler's exception."""
    return HANDLERS[handler](msg, context)


def preload(cfg: Config) -> None:
    """Load ``cfg``'s base model and tokenizer into this process now (a node worker, before round 0)."""
    _runtime(cfg.model)
