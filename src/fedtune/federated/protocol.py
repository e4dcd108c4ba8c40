"""The server <-> client protocol: typed instructions and replies <-> Flower records.

Every message fedtune sends is one of the dataclasses below, and every record key is
written once, here: a field ``server_round`` travels as ``server-round``. Scalars go in the
message's ``config`` record (instructions) or ``metrics`` record (replies); adapter arrays
in an ``ArrayRecord`` each, named after their field. An instruction names its job
explicitly (:class:`Job`), so a client never guesses what it was asked from which keys are
present, and carries the run's resolved config, parsed once per message.

Decoding checks the schema: the protocol version, every required field present, every
value of its declared type, no unknown field. A message from a foreign or older app is
refused with a :class:`ProtocolError` naming the field, so a client answers it with an
error reply and the server leaves such a reply out; the round goes on either way.

::

    server                                 client
    Query(config)                 ->       QueryReply(partition_id, num_train, num_test)
    Instruction(job, round, ...)  ->       TrainReply(adapter, num_examples, ...)  (train)
                                           EvaluateReply(eval_loss, ...)           (evaluate)
    CaseQuery(question, k)        ->       CaseHits(texts, ids, sources, ranks)    (query.case)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedtune.config import Config, config_from_toml_text
from fedtune.errors import FedtuneError
from fedtune.scalars import NO_MATCH, match_scalar

PROTOCOL = 1  # bump when a field changes meaning: peers of another version are then refused


class ProtocolError(FedtuneError):
    """A message that does not follow this protocol (foreign app, older version, bad field)."""


class Job(enum.StrEnum):
    """What a train or evaluate instruction asks of the client."""

    PLAIN = "plain"  # the global adapter, trained or evaluated as it is
    RANKED = "ranked"  # an own-rank adapter, optionally on top of a frozen global update
    GLOBAL = "global"  # evaluate a heterogeneous-rank global adapter at scaling 1
    FFLORA = "fflora"  # the global adapter fused with the client's personal one
    SPLIT = "split"  # head + tail adapters around the server's trunk service


_PROTOCOL_KEY = "fedtune-protocol"
_T = TypeVar("_T", bound="_Wire")


def _key(f: dataclasses.Field[Any]) -> str:
    """A field's record key: its ``key`` metadata, else its name with dashes."""
    return str(f.metadata.get("key", f.name.replace("_", "-")))


# Flower's own strategies and mods look for the model in the ArrayRecord named "arrays"
_ARRAYS = {"key": "arrays"}


class _Field(typing.NamedTuple):
    """One dataclass field as the wire sees it."""

    name: str
    key: str  # its record key
    hint: Any  # its resolved annotation
    arrays: bool  # travels as an ArrayRecord of its own
    required: bool
    default: Any  # left off the wire when the value equals it


_SCHEMAS: dict[type, tuple[_Field, ...]] = {}


def _schema(cls: type) -> tuple[_Field, ...]:
    """``cls``'s fields, resolved once per class (not per message)."""
    if cls not in _SCHEMAS:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            tp, factory = hints[f.name], f.default_factory
            default = factory() if callable(factory) else None
            if f.default is not dataclasses.MISSING:
                default = f.default
            required = f.default is dataclasses.MISSING and not callable(factory)
            arrays = tp is ArrayRecord or ArrayRecord in typing.get_args(tp)
            out.append(_Field(f.name, _key(f), tp, arrays, required, default))
        _SCHEMAS[cls] = tuple(out)
    return _SCHEMAS[cls]


@functools.lru_cache(maxsize=4)
def _toml(cfg: Config) -> str:
    """A config as TOML, once per config (every instruction of a run carries the same one)."""
    return cfg.to_toml()


class _Wire:
    """Field-by-field conversion between a dataclass and a Flower RecordDict."""

    scalars: ClassVar[str]  # the record that holds the scalar fields: "config" or "metrics"

    def to_content(self) -> RecordDict:
        scalars: dict[str, Any] = {_PROTOCOL_KEY: PROTOCOL}
        arrays: dict[str, ArrayRecord] = {}
        for f in _schema(type(self)):
            value = getattr(self, f.name)
            if value is None or value == f.default:  # absent means the default (Flower refuses [])
                continue
            if isinstance(value, ArrayRecord):
                arrays[f.key] = value
            elif isinstance(value, Config):
                scalars[f.key] = _toml(value)
            elif isinstance(value, tuple):
                scalars[f.key] = list(value)
            else:
                scalars[f.key] = value.value if isinstance(value, enum.Enum) else value
        record = ConfigRecord(scalars) if self.scalars == "config" else MetricRecord(scalars)
        return RecordDict({self.scalars: record, **arrays})

    @classmethod
    def from_content(cls: type[_T], content: RecordDict, *, where: str = "message") -> _T:
        scalars = content.get(cls.scalars)
        if not isinstance(scalars, ConfigRecord | MetricRecord):
            raise ProtocolError(f"{where}: not a fedtune message (no {cls.scalars!r} record)")
        version = scalars.get(_PROTOCOL_KEY)
        if version is None:
            raise ProtocolError(f"{where}: not a fedtune message (no field {_PROTOCOL_KEY!r})")
        if version != PROTOCOL:
            raise ProtocolError(
                f"{where}: field {_PROTOCOL_KEY!r} is {version!r}, this side speaks {PROTOCOL!r}"
            )
        schema = _schema(cls)
        known = {f.key for f in schema}
        unknown = sorted(set(scalars) - known - {_PROTOCOL_KEY})
        unknown += sorted(k for k in content if k != cls.scalars and k not in known)
        if unknown:
            raise ProtocolError(f"{where}: unknown field {unknown[0]!r} ({cls.__name__})")
        values = {}
        for f in schema:
            raw = content.get(f.key) if f.arrays else scalars.get(f.key)
            if raw is None:
                if f.required:
                    raise ProtocolError(f"{where}: missing field {f.key!r} ({cls.__name__})")
                continue
            values[f.name] = _decode(raw, f.hint, f"{where}: field {f.key!r}")
        return cls(**values)


def _decode(raw: Any, tp: Any, where: str) -> Any:
    """``raw`` as type ``tp`` (a field's annotation), or a ProtocolError naming the field."""
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    options = tuple(o for o in options if o is not type(None))
    for option in options:
        if option is ArrayRecord and isinstance(raw, ArrayRecord):
            return raw
        if option is Config and isinstance(raw, str):
            try:
                return config_from_toml_text(raw, source=where)
            except FedtuneError as err:  # a config this version does not accept
                raise ProtocolError(str(err)) from None
        if isinstance(option, type) and issubclass(option, enum.Enum) and isinstance(raw, str):
            try:
                return option(raw)
            except ValueError:
                raise ProtocolError(f"{where}: unknown value {raw!r}") from None
        if (got := match_scalar(raw, [option])) is not NO_MATCH:
            return got
        if typing.get_origin(option) is tuple and isinstance(raw, list):  # tuple[str, ...], tuple[int, ...]
            items = [match_scalar(v, typing.get_args(option)[:1]) for v in raw]
            if NO_MATCH not in items:
                return tuple(items)
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ProtocolError(f"{where}: expected {names}, got {type(raw).__name__} {raw!r}"[:300])


@dataclass(frozen=True)
class Query(_Wire):
    """Discovery: who is this client and how much data does it hold."""

    scalars: ClassVar[str] = "config"
    config: Config


@dataclass(frozen=True)
class QueryReply(_Wire):
    """A client's answer to a :class:`Query`: its partition and its train and test example counts."""

    scalars: ClassVar[str] = "metrics"
    partition_id: int
    num_train: int
    num_test: int


@dataclass(frozen=True)
class Instruction(_Wire):
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
    adapter: ArrayRecord | None = field(default=None, metadata=_ARRAYS)
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
        return self


_FIELDS = {f.name: f.key for f in _schema(Instruction)}


@dataclass(frozen=True)
class TrainReply(_Wire):
    """A client's trained adapter and what the round loop and the strategies read about its training."""

    scalars: ClassVar[str] = "metrics"
    partition_id: int
    num_examples: int
    adapter: ArrayRecord = field(metadata=_ARRAYS)
    train_loss: float
    steps: int  # optimiser steps taken (SCAFFOLD divides by them)
    lr: float  # the learning rate the client trained at this round
    first_step_at: float
    seconds: float
    trunk_bytes_up: float | None = None  # SPLIT: what crossed the cut
    trunk_bytes_down: float | None = None
    unclipped: int | None = None  # DP, adaptive clipping: 1 if the update's norm was within the clip norm
    local_epsilon: float | None = None  # privacy.local_dp: this client's ε spent so far (DP-SGD)


@dataclass(frozen=True)
class EvaluateReply(_Wire):
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


CASE_QUERY = f"{MessageType.QUERY}.case"  # Flower routes it to the ClientApp's @app.query("case")


@dataclass(frozen=True)
class CaseQuery(_Wire):
    """A search of the clients' case bases (:data:`CASE_QUERY`): each returns its top ``k`` for ``question``.

    Answered only where ``rag.share_case_base`` (the SuperNode's, else ``config``'s) allows; else an error.
    """

    scalars: ClassVar[str] = "config"
    config: Config
    question: str
    k: int

    def check(self) -> CaseQuery:
        """A non-blank question and a positive ``k``."""
        if not self.question.strip() or self.k <= 0:
            bad = "question" if not self.question.strip() else "k"
            raise ProtocolError(f"case query: field {bad!r} is {getattr(self, bad)!r}; expected text, k > 0")
        return self


@dataclass(frozen=True)
class CaseHits(_Wire):
    """A client's top passages for a :class:`CaseQuery`, best first: text, id, source, rank in its own base.

    No retriever scores: those of bases built apart are not comparable, ranks are. Text needs a ConfigRecord.
    """

    scalars: ClassVar[str] = "config"
    partition_id: int
    texts: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    ranks: tuple[int, ...] = ()

    def check(self) -> CaseHits:
        """One id, source and rank per text; ranks 1, 2, ... in order."""
        for name, want in (("ids", None), ("sources", None), ("ranks", tuple(range(1, len(self.texts) + 1)))):
            got = getattr(self, name)
            if len(got) != len(self.texts) or (want is not None and got != want):
                raise ProtocolError(f"case hits: field {name!r} is {list(got)} for {len(self.texts)} texts")
        return self


def case_query_message(query: CaseQuery, node_id: int) -> Message:
    """A Flower ``query.case`` message carrying ``query`` to node ``node_id``."""
    return Message(content=query.to_content(), message_type=CASE_QUERY, dst_node_id=node_id)


def instruction_message(inst: Instruction, message_type: str, node_id: int) -> Message:
    """A Flower message of ``message_type`` (train or evaluate) carrying ``inst`` to node ``node_id``."""
    return Message(content=inst.to_content(), message_type=message_type, dst_node_id=node_id)


def read_instruction(msg: Message) -> Instruction:
    """The instruction in a train/evaluate message; ProtocolError names what is wrong."""
    return Instruction.from_content(msg.content, where=f"{msg.metadata.message_type} instruction").check()


def read_reply(msg: Message, kind: type[_T]) -> _T:
    """A client's reply as ``kind``; ProtocolError names the node and the field."""
    return kind.from_content(msg.content, where=f"reply from node {msg.metadata.src_node_id}")


def reply_message(reply: _Wire, to: Message) -> Message:
    """A Flower message carrying ``reply`` in answer to ``to``."""
    return Message(reply.to_content(), reply_to=to)


def query_message(cfg: Config, node_id: int) -> Message:
    """A Flower query message carrying ``cfg`` to node ``node_id``."""
    return Message(content=Query(cfg).to_content(), message_type=MessageType.QUERY, dst_node_id=node_id)


__all__ = [
    "CASE_QUERY",
    "PROTOCOL",
    "CaseHits",
    "CaseQuery",
    "EvaluateReply",
    "Instruction",
    "Job",
    "ProtocolError",
    "Query",
    "QueryReply",
    "RoundMetrics",
    "TrainReply",
    "case_query_message",
    "instruction_message",
    "query_message",
    "read_instruction",
    "read_reply",
    "reply_message",
]
