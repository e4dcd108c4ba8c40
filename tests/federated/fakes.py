"""Strategies driven by hand: instructions out, protocol replies back, no Flower runtime."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
from flwr.app import ConfigRecord, Error, Message

from fedtune.config import load_config
from fedtune.federated.protocol import EvaluateReply, TrainReply, read_instruction, reply_message
from fedtune.federated.records import to_record
from fedtune.federated.strategies import AdapterStrategy, build_strategy

NODE = 1000  # node id of partition p is NODE + p


def task_identity() -> Iterator[None]:
    """Messages built outside a Flower runtime: give them the identity one would."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = None, None, None


def strategy(*overrides: str, clients: int = 3) -> AdapterStrategy:
    cfg = load_config("configs/tiny.toml", [f"partition.num_partitions={clients}", *overrides])
    return build_strategy(cfg, {NODE + i: i for i in range(clients)})


def send(
    s: AdapterStrategy, server_round: int, global_state: Mapping[str, np.ndarray], *, train: bool = True
):
    """The strategy's messages for a phase: ``{pid: (instruction, message)}``."""
    configure = s.configure_train if train else s.configure_evaluate
    out = {}
    for msg in configure(server_round, to_record(dict(global_state), "float32"), ConfigRecord(), None):
        pid = msg.metadata.dst_node_id - NODE
        msg.metadata.__dict__["_message_id"] = f"m{server_round}-{pid}-{train}"  # as the runtime assigns
        out[pid] = (read_instruction(msg), msg)
    return out


def train_reply(msg: Message, pid: int, state: Mapping[str, np.ndarray], n: int, **fields) -> Message:
    reply = TrainReply(
        partition_id=pid,
        num_examples=n,
        adapter=to_record(dict(state), "float32"),
        train_loss=fields.pop("train_loss", 1.0),
        steps=fields.pop("steps", 1),
        lr=fields.pop("lr", 1e-3),
        first_step_at=0.0,
        seconds=0.1,
        **fields,
    )
    return reply_message(reply, msg)


def eval_reply(msg: Message, pid: int, loss: float = 1.0, n: int = 1) -> Message:
    reply = EvaluateReply(
        partition_id=pid,
        num_examples=n,
        eval_loss=loss,
        perplexity=float(np.exp(loss)),
        num_tokens=n,
        seconds=0.0,
    )
    return reply_message(reply, msg)


def error_reply(msg: Message, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=msg)


def train_round(s: AdapterStrategy, server_round: int, global_state, states: dict, sizes: dict):
    """One train phase: every sampled client replies with ``states[pid]``; returns (aggregate, sent)."""
    from fedtune.federated.records import from_record

    sent = send(s, server_round, global_state)
    replies = [train_reply(msg, pid, states[pid], sizes[pid]) for pid, (_, msg) in sent.items()]
    arrays, _ = s.aggregate_train(server_round, replies)
    return (from_record(arrays) if arrays is not None else None), sent


def eval_round(s: AdapterStrategy, server_round: int, global_state, fail: set[int] = frozenset()):
    """One evaluate phase; clients in ``fail`` answer with an error. Returns the instructions sent."""
    sent = send(s, server_round, global_state, train=False)
    replies = [
        error_reply(msg, "client lost its disk") if pid in fail else eval_reply(msg, pid)
        for pid, (_, msg) in sent.items()
    ]
    s.aggregate_evaluate(server_round, replies)
    return {pid: inst for pid, (inst, _) in sent.items()}


class FakeGrid:
    """A Grid without a runtime, for the round loop: ``answer(pid, message)`` replies to each message.

    ``answer`` returns the reply, or None for a client that never answers. Node ids are
    ``NODE + pid`` as in :func:`strategy`; ``sent`` keeps every message pushed.
    """

    def __init__(self, answer, nodes: int = 3) -> None:  # type: ignore[no-untyped-def]
        self.answer = answer
        self.nodes = [NODE + i for i in range(nodes)]
        self.sent: list[Message] = []
        self._ready: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages) -> list[str]:  # type: ignore[no-untyped-def]
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"  # as the runtime assigns
            self.sent.append(msg)
            reply = self.answer(msg.metadata.dst_node_id - NODE, msg)
            if reply is not None:
                self._ready[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids) -> list[Message]:  # type: ignore[no-untyped-def]
        return [self._ready.pop(i) for i in list(ids) if i in self._ready]


def query_reply(msg: Message, pid: int, n: int = 4) -> Message:
    from fedtune.federated.protocol import QueryReply

    return reply_message(QueryReply(pid, n, 1), msg)
