"""Failed clients: the quorum a round completes on, and one ``metrics.jsonl`` line per failure.

A phase sends one message per sampled client and waits until all have replied or its
deadline (``fed.round_timeout``) passes. A client has failed when

- its reply carries an error: the ClientApp raised, or its process died or hung (the
  SuperNode then answers for it, see :data:`ERROR_CODES`), or its node went away;
- its reply does not follow the protocol (a foreign or malformed reply);
- no reply came by the deadline.

Each failure becomes one :func:`~fedtune.metrics.failure_line`; the round completes on the
good replies when there are at least :func:`train_quorum` of them (the round loop,
:mod:`fedtune.federated.server_app`, retries or stops otherwise). Pure functions over the
messages of one phase; nothing here waits or sends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from flwr.app import Message

from fedtune.config import Config, FedConfig
from fedtune.federated.protocol import EvaluateReply, ProtocolError, QueryReply, TrainReply, read_reply
from fedtune.metrics import MetricLine, failure_line

# Flower 1.41's ErrorCode (flwr/common/constant.py; not public API): what an error reply means
ERROR_CODES = {
    0: "unknown error",
    1: "the ClientApp failed to load",
    2: "the ClientApp raised an exception",
    3: "the message expired before the node fetched it",
    4: "the reply expired",
    5: "the node stopped sending heartbeats",
    6: "a mod refused the message",
    7: "the node could not install the app",
    8: "the ClientApp process died or stopped responding",  # SIGKILL, OOM kill, a hang
}


def train_quorum(fed: FedConfig, sampled: int) -> int:
    """Good train replies a round of ``sampled`` clients needs: ``max(n_min, ceil(f x sampled))``.

    ``n_min`` is ``fed.min_train_replies``, ``f`` is ``fed.min_train_fraction``.
    """
    return max(fed.min_train_replies, math.ceil(fed.min_train_fraction * sampled - 1e-9))


def phase_deadline(cfg: Config) -> float:
    """Seconds a phase waits for its replies: ``fed.round_timeout``, else ``fed.timeout``."""
    return cfg.fed.round_timeout or cfg.fed.timeout


def deadline_key(cfg: Config) -> str:
    """The setting a missing reply overran, for its failure line."""
    if cfg.fed.round_timeout is not None:
        return f"fed.round_timeout={cfg.fed.round_timeout:g}s"
    return f"fed.timeout={cfg.fed.timeout:g}s"


def error_cause(msg: Message) -> str:
    """An error reply's cause in words: what its code means, and Flower's own reason."""
    code = int(msg.error.code)
    return f"error reply {code} ({ERROR_CODES.get(code, 'unknown code')}): {msg.error.reason}"


@dataclass(frozen=True)
class PhaseOutcome:
    """What came back in one phase: the good replies and a failure line per failed client."""

    good: list[Message]
    failures: list[MetricLine]


def phase_outcome(
    server_round: int,
    phase: str,
    sent: Sequence[Message],
    replies: Sequence[Message],
    kind: type[TrainReply | EvaluateReply | QueryReply],
    partition_of: Mapping[int, int],
    deadline: str,
    check: Callable[[Message], object] | None = None,
) -> PhaseOutcome:
    """Sort a phase's ``replies`` to the ``sent`` messages into good ones and failures.

    ``partition_of`` maps node id -> partition id (unknown nodes get ``client`` None);
    ``deadline`` names the wait a missing reply exceeded (e.g. ``"fed.round_timeout=60s"``);
    ``check`` may refuse a reply that reads fine with a ProtocolError (a train reply's adapter
    that does not decode), so it fails here and does not count towards the quorum.
    Failures come in partition order (then node order), whatever order the replies came in.
    """
    good, failures = [], []

    def failed(node: int, cause: str) -> None:
        failures.append(failure_line(server_round, phase, node, partition_of.get(node), cause))

    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            failed(node, error_cause(msg))
            continue
        try:
            read_reply(msg, kind)
            if check is not None:
                check(msg)
        except ProtocolError as err:
            failed(node, f"reply fails the protocol: {err}")
            continue
        good.append(msg)
    answered = {m.metadata.reply_to_message_id for m in replies}
    for msg in sent:
        if msg.metadata.message_id not in answered:
            failed(msg.metadata.dst_node_id, f"no reply within {deadline}")
    failures.sort(key=lambda line: (line["client"] is None, line["client"] or 0, line["node"]))
    return PhaseOutcome(good, failures)
