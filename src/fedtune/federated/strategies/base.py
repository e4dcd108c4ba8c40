"""The base of every fedtune strategy: Flower's ``Strategy`` interface over LoRA adapters.

:class:`AdapterStrategy` implements Flower's public Message-API ``Strategy`` (configure /
aggregate train and evaluate) with what an LLM run needs:

- clients are sampled by partition id, seeded per (seed, round): resumable, unlike node ids;
- each client gets a typed :class:`~fedtune.federated.protocol.Instruction`; the adapter is
  cast to the wire dtype on the way down, the server keeps float32;
- every reply is read through the protocol and every update checked (keys, shapes, dtype,
  NaN/Inf, optionally norms); a bad one is logged and left out, the round goes on;
- updates are aggregated in partition order by :meth:`aggregate_updates` (pure maths);
- per-client metric lines (:class:`~fedtune.metrics.MetricLine`) go to ``round_log``.

A strategy overrides one or two hooks: :meth:`instruction` (what one client is sent) and
:meth:`aggregate_updates` (the rule); stateful ones also :meth:`server_state` /
:meth:`load_server_state`, which the round loop checkpoints with every round.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune.config import Config, LoraConfig
from fedtune.federated.aggregation.fedavg import fedavg, weighted_mean
from fedtune.federated.aggregation.validate import clip_update, filter_updates
from fedtune.federated.protocol import (
    EvaluateReply,
    Instruction,
    Job,
    ProtocolError,
    RoundMetrics,
    TrainReply,
    instruction_message,
    read_reply,
)
from fedtune.federated.records import from_record, to_record
from fedtune.metrics import MetricLine, line_from_reply
from fedtune.models.adapters import sent_keys
from fedtune.privacy.dpfedavg import clip_delta, global_norm
from fedtune.privacy.server import ServerDp, split_state

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
_R = TypeVar("_R", TrainReply, EvaluateReply)


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's payload: tensor data, keys, configs and metrics."""
    return sum(record.count_bytes() for record in content.values())


def sample_clients(
    partition_ids: Iterable[int],
    fraction: float,
    minimum: int,
    seed: int,
    server_round: int,
    attempt: int = 0,
) -> list[int]:
    """A reproducible sample: ``max(minimum, floor(fraction * n))`` ids, drawn per (seed, round, attempt)."""
    ids = sorted(partition_ids)
    size = min(len(ids), max(minimum, math.floor(fraction * len(ids))))
    if size >= len(ids):
        return ids
    rng = random.Random(f"fedtune-{seed}-{server_round}" + (f"-{attempt}" if attempt else ""))
    return sorted(rng.sample(ids, size))


@dataclass(frozen=True)
class Update:
    """One accepted client update, as the aggregation rule sees it: its state and its reply."""

    state: Arrays
    reply: TrainReply

    @property
    def pid(self) -> int:
        return self.reply.partition_id

    @property
    def weight(self) -> int:
        """The FedAvg weight: the client's training examples."""
        return self.reply.num_examples


class AdapterStrategy(Strategy):
    """FedAvg over adapter state dicts, weighted by each client's training examples.

    ``clients`` maps node id -> partition id (from discovery). ``instruction_fields`` are
    added to every instruction (the round loop sets the run directory and, in split runs,
    the trunk services' addresses).
    """

    def __init__(self, cfg: Config, clients: dict[int, int]) -> None:
        self.cfg = cfg
        self.node_of = {pid: node for node, pid in clients.items()}  # partition id -> node id
        self.round_log: list[MetricLine] = []
        self.instruction_fields: dict[str, Any] = {}
        self.run_dir: str | None = None  # where simulated clients keep state (FF-LoRA, stack cache)
        self.current_round = 0  # the round being configured or aggregated
        self.attempt = 0  # the try of this round's train phase: a retry samples afresh
        self._sent: dict[int, int] = {}  # node id -> bytes sent this phase
        self._references: dict[int, Arrays] = {}  # partition id -> start state sent this round
        self._wire_global: ArrayRecord | None = None
        self._wire_decoded: Arrays | None = None  # _wire_global as the clients decode it
        self._global: Arrays = {}  # the global adapter at the start of this round
        self.dp = ServerDp(cfg) if cfg.privacy.dp else None  # client-level DP-FedAvg
        self.round_figures: dict[str, Any] = {}  # the round's privacy figures, for its server line

    def summary(self) -> None:
        log.info("%s over %s clients", type(self).__name__, len(self.node_of))

    def global_lora(self, state: Arrays) -> LoraConfig:
        """The LoRA config under which the global adapter ``state`` is saved and served."""
        return self.cfg.model.lora

    # -- sending ------------------------------------------------------------------
    def wire_global(self, state: Arrays) -> ArrayRecord:
        """``state`` in the wire dtype, encoded once per phase and shared by every client."""
        if self._wire_global is None:
            self._wire_global = to_record(state, self.cfg.fed.wire_dtype, self.cfg.fed.wire_block)
        return self._wire_global

    def instruction(self, pid: int, global_state: Arrays, message_type: str) -> tuple[Instruction, Arrays]:
        """What client ``pid`` is sent, and the start state its update is checked against.

        Every client gets the global adapter here; strategies whose clients differ
        (heterogeneous ranks, control variates) override this and call ``super()``.
        """
        job = Job.SPLIT if self.cfg.split.enabled else Job.PLAIN
        inst = self.make_instruction(job, adapter=self.wire_global(global_state))
        return inst, global_state

    def received(self, record: ArrayRecord) -> Arrays:
        """``record`` as a client decodes it; the shared wire global is decoded once per phase."""
        if record is not self._wire_global:
            return from_record(record)
        if self._wire_decoded is None:
            self._wire_decoded = from_record(record)
        return self._wire_decoded

    def make_instruction(self, job: Job, **fields: Any) -> Instruction:
        """An instruction for this phase with the round loop's ``instruction_fields``."""
        if self.cfg.fed.error_feedback:  # the client keeps its rounding error under the run's state root
            fields.setdefault("run_dir", self.run_dir)
        return Instruction(
            job=job, server_round=self.current_round, config=self.cfg, **self.instruction_fields, **fields
        )

    def _messages(
        self, global_state: Arrays, message_type: str, fraction: float, minimum: int
    ) -> list[Message]:
        if fraction == 0.0:
            return []
        if self.dp is not None and message_type == MessageType.TRAIN:
            chosen = self.dp.sample(self.node_of, self.current_round)
        else:
            attempt = self.attempt if message_type == MessageType.TRAIN else 0
            chosen = sample_clients(
                self.node_of, fraction, minimum, self.cfg.seed, self.current_round, attempt
            )
        self._wire_global, self._wire_decoded = None, None
        self._sent = {}
        messages = []
        for pid in chosen:
            inst, reference = self.instruction(pid, global_state, message_type)
            if self.dp is not None and message_type == MessageType.TRAIN:
                inst = replace(inst, clip_norm=self.dp.clip_norm, noise_std=self.dp.client_noise_std)
                if inst.adapter is not None:  # the client clips against what it received (wire dtype)
                    reference = self.received(inst.adapter)
            msg = instruction_message(inst, message_type, self.node_of[pid])
            self._sent[self.node_of[pid]] = payload_bytes(msg.content)
            if message_type == MessageType.TRAIN:
                self._references[pid] = self.sent_part(reference)
            messages.append(msg)
        log.debug("round %s %s: clients %s", self.current_round, message_type, chosen)
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_round = server_round
        self._references = {}
        self._global = from_record(arrays)
        fed = self.cfg.fed
        return self._messages(self._global, MessageType.TRAIN, fed.fraction_train, fed.min_train_clients)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current_round = server_round
        fed = self.cfg.fed
        return self._messages(
            from_record(arrays), MessageType.EVALUATE, fed.fraction_evaluate, fed.min_evaluate_clients
        )

    # -- receiving ----------------------------------------------------------------
    def read_replies(self, replies: Iterable[Message], kind: type[_R]) -> list[tuple[Message, _R]]:
        """Replies that carry no error and follow the protocol, in partition order."""
        good: list[tuple[Message, _R]] = []
        for msg in replies:
            if msg.has_error():
                log.warning("client on node %s failed: %s", msg.metadata.src_node_id, msg.error.reason)
                continue
            try:
                good.append((msg, read_reply(msg, kind)))
            except ProtocolError as err:
                log.warning("round %s: reply left out: %s", self.current_round, err)
        good.sort(key=lambda pair: pair[1].partition_id)
        self.replies_read({reply.partition_id for _, reply in good})
        return good

    def replies_read(self, fine: set[int]) -> None:
        """Hook: the partitions whose replies came back fine this phase."""

    def _line(self, phase: str, msg: Message, reply: TrainReply | EvaluateReply) -> MetricLine:
        up, down = payload_bytes(msg.content), self._sent.get(msg.metadata.src_node_id, 0)
        line = line_from_reply(self.current_round, phase, reply, bytes_up=up, bytes_down=down)
        self.round_log.append(line)
        return line

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.current_round = server_round
        read, states = self.decoded(self.read_replies(replies, TrainReply))
        start = len(self.round_log)
        lines = [self._line("train", msg, reply) for msg, reply in read]
        pids = [reply.partition_id for _, reply in read]
        kept, reasons = filter_updates(
            states,
            [self._references[p] for p in pids],
            where=[f"client {p}" for p in pids],
            max_norm=None,
            norm_factor=self.cfg.fed.outlier_norm_factor,
        )
        for i, reason in zip(sorted(set(range(len(states))) - set(kept)), reasons, strict=True):
            self.round_log[start + i] = {**lines[i], "rejected": reason}
            log.warning("round %s: update rejected: %s", server_round, reason)
        updates = [Update(states[i], read[i][1]) for i in kept]
        if self.dp is not None:
            return self._aggregate_private(updates, {i: start + k for i, k in enumerate(kept)})
        if not kept:
            return None, None
        if self.cfg.fed.clip_norm is not None:
            clip = self.cfg.fed.clip_norm
            updates = [replace(u, state=clip_update(u.state, self._references[u.pid], clip)) for u in updates]
        return self._result(self.aggregate_updates(updates), updates)

    def decode(self, reply: TrainReply) -> Arrays:
        """A reply's adapter (a ``delta`` one added to what was sent); a ProtocolError names the fault."""
        where = f"client {reply.partition_id}"
        if reply.delta not in (None, 1):
            raise ProtocolError(f"{where}: field 'delta' is {reply.delta}, not 1 or absent")
        reference = self._references.get(reply.partition_id, {}) if reply.delta else None
        return from_record(reply.adapter, check_finite=False, delta_of=reference, where=where)

    def decoded(self, read: list[tuple[Message, TrainReply]]) -> tuple[list[Any], list[Arrays]]:
        """Replies whose adapters decode, and their states; any other is logged and left out."""
        kept, states = [], []
        for msg, reply in read:
            try:
                states.append(self.decode(reply))
                kept.append((msg, reply))
            except ProtocolError as err:
                log.warning("round %s: reply left out: %s", self.current_round, err)
        return kept, states

    def sent_part(self, state: Arrays) -> Arrays:
        """The part of an adapter clients send back: all of it, or only B under FFA-LoRA."""
        if not self.cfg.model.lora.freeze_a:
            return state
        return {k: state[k] for k in sent_keys(state, self.cfg.model.lora)}

    def filled(self, part: Arrays) -> Arrays:
        """A mean over :meth:`sent_part` completed with the round's global (FFA-LoRA's frozen A)."""
        if part.keys() == self._global.keys() or not self.cfg.model.lora.freeze_a:
            return part
        return {k: part.get(k, v) for k, v in self._global.items()}

    def _result(self, merged: Arrays, updates: list[Update]) -> tuple[ArrayRecord, MetricRecord]:
        merged = self.filled(merged)
        if merged.keys() == self._global.keys():  # the global's key order, whatever the replies'
            merged = {k: merged[k] for k in self._global}
        weights = [u.weight for u in updates]
        loss = weighted_mean([u.reply.train_loss for u in updates], weights) if updates else math.nan
        return to_record(merged, "float32"), RoundMetrics(loss, len(updates)).to_record()

    def aggregate_updates(self, updates: list[Update]) -> Arrays:
        """The aggregation rule over the accepted updates (FedAvg here)."""
        return self.apply_mean(self.filled(fedavg([u.state for u in updates], [u.weight for u in updates])))

    def apply_mean(self, mean: Arrays) -> Arrays:
        """The new global adapter from the clients' mean state (sum-type strategies; FedAvg: itself).

        DP-FedAvg and secure aggregation compute the mean themselves and hand it here.
        """
        return dict(mean)

    def _aggregate_private(
        self, updates: list[Update], line_of: dict[int, int]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """DP-FedAvg: clipped updates, uniformly weighted, noised; an unclipped one is left out."""
        assert self.dp is not None
        template = self.sent_part(self._global)
        dims = sum(v.size for v in template.values())
        bound, kept, deltas, within = self.dp.max_delta_norm(dims), [], [], []
        for i, u in enumerate(updates):
            ref = self._references[u.pid]
            delta = {k: u.state[k].astype(np.float64) - ref[k].astype(np.float64) for k in ref}
            if (norm := global_norm(delta)) > bound:
                reason = (
                    f"client {u.pid}: unclipped: update norm {norm:.4g} > {bound:.4g} (privacy.clip_norm)"
                )
                self.round_log[line_of[i]] = {**self.round_log[line_of[i]], "rejected": reason}
                log.warning("round %s: update rejected: %s", self.current_round, reason)
                continue
            if self.cfg.privacy.noise == "server":  # the sensitivity is C whatever the client did
                delta = clip_delta(delta, self.dp.clip_norm)[0]
            kept.append(u)
            deltas.append(delta)
            within.append(bool(u.reply.unclipped))
        mean, self.round_figures = self.dp.aggregate(deltas, within, template, self.current_round)
        merged = self.apply_mean(self.filled({k: template[k] + mean[k] for k in template}))
        return self._result(merged, kept)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        self.current_round = server_round
        read = self.read_replies(replies, EvaluateReply)
        if not read:
            return None
        for msg, reply in read:
            self._line("evaluate", msg, reply)
        loss = weighted_mean([r.eval_loss for _, r in read], [r.num_examples for _, r in read])
        return RoundMetrics(loss, len(read)).to_record()

    def aggregate_mean(
        self,
        server_round: int,
        mean_update: Arrays,
        replies: list[TrainReply],
        weights: list[float],
        traffic: dict[int, tuple[int, int]] | None = None,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global from the clients' weighted mean update alone (SecAgg+ reveals only that).

        ``mean_update`` is ``Σ w_i Δ_i / Σ w_i`` over :meth:`sent_part` of the adapter; under
        client-level DP every weight is 1 and the updates were clipped by the clients, so the
        sum is ``n`` times the mean and is noised and divided by the expected cohort as usual.
        ``traffic``: node id -> (bytes down, bytes up) over the round, for the clients' lines.
        """
        self.current_round = server_round
        template = self.sent_part(self._global)
        for reply in replies:
            down, up = (traffic or {}).get(self.node_of.get(reply.partition_id, -1), (0, 0))
            self.round_log.append(line_from_reply(server_round, "train", reply, bytes_up=up, bytes_down=down))
        if not replies:
            return None, None
        if self.dp is not None:
            total = {k: np.asarray(v, dtype=np.float64) * len(replies) for k, v in mean_update.items()}
            mean_update, self.round_figures = self.dp.aggregate(
                [total], [], template, server_round, count=len(replies)
            )
        merged = self.apply_mean(self.filled({k: template[k] + mean_update[k] for k in template}))
        if merged.keys() == self._global.keys():
            merged = {k: merged[k] for k in self._global}
        loss = weighted_mean([r.train_loss for r in replies], weights)
        return to_record(merged, "float32"), RoundMetrics(loss, len(replies)).to_record()

    # -- server state (for exact resume) -------------------------------------------
    def checkpoint(self) -> Arrays:
        """What the round loop saves with every round: :meth:`server_state` and the DP state."""
        return {**self.server_state(), **(self.dp.state() if self.dp is not None else {})}

    def restore(self, state: Arrays, current: Arrays) -> None:
        """Restore :meth:`checkpoint` output; ``current`` is the global adapter it goes with."""
        own, private = split_state(state)
        if self.dp is not None:
            self.dp.load(private)
        self.load_server_state(own, current)

    def server_state(self) -> Arrays:
        """State to checkpoint with the round ({} for stateless strategies)."""
        return {}

    def load_server_state(self, state: Arrays, current: Arrays) -> None:
        """Restore :meth:`server_state` output; ``current`` is the global adapter it goes with."""
