"""The messages of a round: discovery, train and evaluate instructions, the clients' replies."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedtune.config import Config
from fedtune.federated.protocol.wire import ARRAYS, ProtocolError, T, Wire, schema

SECAGG_RECORD = RECORD_KEY_CONFIGS  # Flower's SecAgg+ record beside a secure round's instruction (.secagg)


class Job(enum.StrEnum):
    """What a train or evaluate instruction asks of the client."""

    PLAIN = "plain"  # the global adapter, trained or evaluated as it is
    RANKED = "ranked"  # an own-rank adapter, optionally on top of a frozen global update
    GLOBAL = "global"  # evaluate a heterogeneous-rank global adapter at scaling 1
    FFLORA = "fflora"  # the global adapter fused with the client's personal one
    SPLIT = "split"  # head + tail adapters around the server's trunk service


@dataclass(frozen=True)
class Query(Wire):
    """Discovery: who is this client and how much data does it hold."""

    scalars: ClassVar[str] = "config"
    config: Config


@dataclass(frozen=True)
class QueryReply(Wire):
    """A client's answer to a :class:`Query`: its partition and its train and test example counts."""

    scalars: ClassVar[str] = "metrics"
    partition_id: int
    num_train: int
    num_test: int


@dataclass(frozen=True)
class Instruction(Wire):
    """A train or evaluate instruction (the Flower message type says which).

    ``adapter`` is the adapter to start from (global, own-rank start state, or head + tail);
    ``rank`` is its rank where it has its own (``RANKED``, ``GLOBAL``) or the personal
    adapter's (``FFLORA``). FLoRA's merge mode may send ``adapter`` / ``frozen`` as the part
    beyond the stack of rank ``*_from`` that the client keeps (see ``stack_cache``).
    """

    scalars: ClassVar[str] = "config"
    job: Job
    server_round: int
    config: Config
    adapter: ArrayRecord | None = field(default=None, metadata=ARRAYS)
    adapter_from: int | None = None
    rank: int | None = None
    frozen: ArrayRecord | None = None  # RANKED: a global update trained on top of, frozen
    frozen_rank: int | None = None
    frozen_from: int | None = None
    correction: ArrayRecord | None = None  # SCAFFOLD: c - c_i, added to every local gradient
    proximal_mu: float = 0.0  # FedProx: weight of mu/2 ||w - w_global||^2
    run_dir: str | None = None  # where a simulated client keeps its state (personal, stack)
    trunk_addresses: tuple[str, ...] = field(default_factory=tuple)  # SPLIT: the trunk services
    clip_norm: float | None = None  # DP: clip the update (trained minus sent) to this L2 norm
    noise_std: float | None = None  # DP with privacy.noise = "client": std of this client's noise share
    secagg: bool = False  # SecAgg+: reply with the update vector, which Flower's mod masks (.secagg)

    def check(self) -> Instruction:
        """The fields this job needs are present (a well-typed but incomplete message is refused)."""
        need = {
            Job.RANKED: ("rank",),
            Job.GLOBAL: ("rank",),
            Job.FFLORA: ("rank",),
            Job.SPLIT: ("trunk_addresses",),
        }.get(self.job, ())
        for name in need:
            if not getattr(self, name):
                raise ProtocolError(f"instruction: job {self.job.value!r} needs field {_FIELDS[name]!r}")
        if self.adapter is None and self.adapter_from is None:
            raise ProtocolError("instruction: missing field 'arrays' (the adapter)")
        if self.frozen is not None and self.frozen_rank is None:
            raise ProtocolError("instruction: field 'frozen' needs field 'frozen-rank'")
        if self.secagg and self.adapter is None:  # the update is the trained adapter minus this one
            raise ProtocolError("instruction: field 'secagg' needs field 'arrays' (the adapter)")
        return self


_FIELDS = {f.name: f.key for f in schema(Instruction)}


@dataclass(frozen=True)
class TrainReply(Wire):
    """A client's trained adapter and what the round loop and the strategies read about its training."""

    scalars: ClassVar[str] = "metrics"
    partition_id: int
    num_examples: int
    adapter: ArrayRecord = field(metadata=ARRAYS)
    train_loss: float
    steps: int  # optimiser steps taken (SCAFFOLD divides by them)
    lr: float  # the learning rate the client trained at this round
    first_step_at: float
    seconds: float
    trunk_bytes_up: float | None = None  # SPLIT: what crossed the cut
    trunk_bytes_down: float | None = None
    unclipped: int | None = None  # DP, adaptive clipping: 1 if the update's norm was within the clip norm
    local_epsilon: float | None = None  # privacy.local_dp: this client's ε spent so far (DP-SGD)
    delta: int | None = None  # 1: ``adapter`` is the update trained - sent (fed.wire_dtype int8 / nf4)


@dataclass(frozen=True)
class EvaluateReply(Wire):
    """A client's held-out loss, perplexity and token count for the adapter it was sent."""

    scalars: ClassVar[str] = "metrics"
    partition_id: int
    num_examples: int
    eval_loss: float
    perplexity: float
    num_tokens: int
    seconds: float
    eval_loss_global: float | None = None  # FFLORA: the global adapter alone
    eval_loss_personal: float | None = None  # FFLORA: the personal adapter alone


@dataclass(frozen=True)
class RoundMetrics:
    """What a strategy's ``aggregate_train`` / ``aggregate_evaluate`` tell the round loop.

    ``loss`` is the clients' example-weighted train or eval loss; ``num_clients`` how many
    replies it is over. Travels as Flower's ``MetricRecord`` (the ``Strategy`` interface).
    """

    loss: float
    num_clients: int

    def to_record(self) -> MetricRecord:
        return MetricRecord({"loss": self.loss, "num-clients": self.num_clients})

    @classmethod
    def from_record(cls, record: MetricRecord) -> RoundMetrics:
        return cls(float(record["loss"]), int(record["num-clients"]))  # type: ignore[arg-type]


def instruction_message(inst: Instruction, message_type: str, node_id: int) -> Message:
    """A Flower message of ``message_type`` (train or evaluate) carrying ``inst`` to node ``node_id``."""
    return Message(content=inst.to_content(), message_type=message_type, dst_node_id=node_id)


def read_instruction(msg: Message) -> Instruction:
    """The instruction in a train/evaluate message; ProtocolError names what is wrong.

    In a SecAgg+ round Flower's record travels beside the instruction; the instruction must say
    so (``secagg``) and the record be there, or the other way round: an update is never sent in
    the clear because a record went missing.
    """
    where = f"{msg.metadata.message_type} instruction"
    secure = SECAGG_RECORD in msg.content
    content = msg.content
    if secure:
        content = RecordDict({name: record for name, record in content.items() if name != SECAGG_RECORD})
    inst = Instruction.from_content(content, where=where).check()
    if inst.secagg != secure:
        state = "there" if secure else "missing"
        raise ProtocolError(f"{where}: field 'secagg' is {inst.secagg}, Flower's SecAgg+ record is {state}")
    return inst


def read_reply(msg: Message, kind: type[T]) -> T:
    """A client's reply as ``kind``; ProtocolError names the node and the field."""
    return kind.from_content(msg.content, where=f"reply from node {msg.metadata.src_node_id}")


def reply_message(reply: Wire, to: Message) -> Message:
    """A Flower message carrying ``reply`` in answer to ``to``."""
    return Message(reply.to_content(), reply_to=to)


def query_message(cfg: Config, node_id: int) -> Message:
    """A Flower query message carrying ``cfg`` to node ``node_id``."""
    return Message(content=Query(cfg).to_content(), message_type=MessageType.QUERY, dst_node_id=node_id)
