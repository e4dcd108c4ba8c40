"""The local channel between a ClientApp and its node worker (``fedtune node``).

A request is a handler's name, the node config and the Flower message itself, as Flower's
own protobuf carries it between SuperNode and ClientApp; a reply is the handler's reply
content, or the exception it raised as text. Each frame is a JSON header and a protobuf
body. The reply names the message it answers, so the ClientApp never takes a reply for
another message (or another run) as its own. The frames travel over
``multiprocessing.connection``, whose HMAC challenge with the worker's token comes first:
nothing is decoded from a peer that does not hold the token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import (
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedtune.federated.protocol.wire import PROTOCOL, ProtocolError

HANDLERS = ("query", "query.case", "train", "evaluate")  # what a worker runs
NODE_STATE = "fedtune-node"  # the ClientApp's record in Flower's Context.state (persists per run)
FALLBACK_SAID = "fallback-said"


def _header(raw: bytes, what: str) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError(f"node worker {what}: header is not JSON") from None
    if not isinstance(header, dict) or header.get("protocol") != PROTOCOL:
        raise ProtocolError(f"node worker {what}: field 'protocol' is not {PROTOCOL}")
    return header


@dataclass(frozen=True)
class WorkRequest:
    """What the ClientApp asks of its worker: run ``handler`` on ``message`` as node ``node_config``."""

    handler: str
    message: Message
    node_config: dict[str, Any]
    run_id: int

    def to_frames(self) -> tuple[bytes, bytes]:
        header = {
            "protocol": PROTOCOL,
            "handler": self.handler,
            "run-id": self.run_id,
            "node-config": self.node_config,
        }
        return json.dumps(header).encode(), message_to_proto(self.message).SerializeToString()

    @classmethod
    def from_frames(cls, head: bytes, body: bytes) -> WorkRequest:
        header = _header(head, "request")
        handler = header.get("handler")
        if handler not in HANDLERS:
            raise ProtocolError(f"node worker request: unknown handler {handler!r}")
        node = header.get("node-config")
        if not isinstance(node, dict):
            raise ProtocolError("node worker request: field 'node-config' is not a table")
        try:
            message = message_from_proto(ProtoMessage.FromString(body))
        except Exception as err:  # a protobuf that does not parse
            raise ProtocolError(f"node worker request: body is not a Flower message ({err})") from None
        return cls(str(handler), message, node, int(header.get("run-id", 0)))

    def context(self) -> Context:
        """The Flower context the handlers read (only ``node_config``; state stays with the ClientApp)."""
        return Context(
            run_id=self.run_id, node_id=0, node_config=self.node_config, state=RecordDict(), run_config={}
        )


@dataclass(frozen=True)
class WorkReply:
    """The worker's answer to message ``message_id``: the reply content, or the handler's error."""

    message_id: str
    content: RecordDict | None = None
    error: str | None = None

    def to_frames(self) -> tuple[bytes, bytes]:
        header = {"protocol": PROTOCOL, "message-id": self.message_id, "error": self.error}
        body = recorddict_to_proto(self.content).SerializeToString() if self.content is not None else b""
        return json.dumps(header).encode(), body

    @classmethod
    def from_frames(cls, head: bytes, body: bytes) -> WorkReply:
        header = _header(head, "reply")
        error = header.get("error")
        content = None if error is not None else recorddict_from_proto(ProtoRecordDict.FromString(body))
        return cls(str(header.get("message-id")), content, None if error is None else str(error))

    def answering(self, msg: Message) -> Message:
        """The reply as a Flower message answering ``msg``; a reply to another message is refused."""
        if self.message_id != msg.metadata.message_id:
            raise ProtocolError(
                f"node worker replied to message {self.message_id!r}, not {msg.metadata.message_id!r}"
            )
        if self.error is not None or self.content is None:
            raise WorkerError(self.error or "node worker sent no reply content")
        return Message(self.content, reply_to=msg)


class WorkerError(RuntimeError):
    """The handler raised in the node worker: its type and message, as the worker logged them."""


def fallback_said(context: Context) -> bool:
    """Whether this node already said, this run, that it works without its worker."""
    record = context.state.get(NODE_STATE)
    return bool(record is not None and record.get(FALLBACK_SAID))


def note_fallback_said(context: Context) -> None:
    """Remember, for this run, that this node said it works without its worker."""
    context.state[NODE_STATE] = ConfigRecord({FALLBACK_SAID: True})
