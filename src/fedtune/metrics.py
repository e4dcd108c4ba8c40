"""One line of a run's ``metrics.jsonl``: the type its writer and its readers share.

The round loop writes one line per client per phase per round (``phase`` ``"train"`` or
``"evaluate"``, ``client`` its partition id) and one ``"server"`` line per round with the
round's totals; round 0 evaluates the starting adapter. A client that failed in a phase
gets one line with ``event`` ``"failure"``, its ``node`` and the ``cause``
(:func:`failure_line`; ``phase`` ``"discovery"`` for a node left out before the rounds);
such a line has no results, so readers look for results, not for phases. The reader
(:func:`parse_line`) checks each key against the annotations below, so a metric added
here is written, read and reported without a second list of keys to edit.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, TypedDict

from fedtune.errors import FedtuneError
from fedtune.scalars import NO_MATCH, match_scalar

__all__ = ["MetricLine", "failure_line", "line_from_reply", "parse_line", "server_line"]


class MetricLine(TypedDict, total=False):
    """One line of ``metrics.jsonl``; every key but ``round`` and ``phase`` may be absent."""

    round: int
    phase: str  # "train" | "evaluate" | "server" | "discovery"
    client: int | None  # partition id; None on server lines
    num_examples: int
    num_clients: int
    bytes_up: int  # payload bytes of the client's reply (server: the round's sum)
    bytes_down: int  # payload bytes of the instruction it was sent
    seconds: float
    train_loss: float
    eval_loss: float
    perplexity: float
    lr: float  # the learning rate the client trained at
    first_step_at: float  # seconds into the client's train call when its first step ran
    eval_loss_global: float  # FF-LoRA: the global adapter alone
    eval_loss_personal: float  # FF-LoRA: the personal adapter alone
    trunk_bytes_up: float  # split: bytes the client sent across the cut
    trunk_bytes_down: float
    trunk_samples: int  # split (server line): samples the trunk trained on
    trunk_passes: int
    rejected: str  # why the server left this client's update out
    unclipped: int  # DP, adaptive clipping: 1 if the client's update was within the clip norm
    local_epsilon: float  # privacy.local_dp: the client's own ε so far (DP-SGD)
    epsilon: float  # privacy.dp (server line): ε spent so far, by privacy.accountant
    epsilon_rdp: float
    epsilon_pld: float
    noise_multiplier: float  # the noise multiplier composed this round
    clip_norm: float  # the clip norm of this round's updates
    noise_to_signal: float  # ‖noise‖ / ‖mean of the clipped updates‖
    within_share: float  # adaptive clipping: the noised share of updates within the clip norm
    event: str  # "failure": the client failed in this phase (no results on the line)
    node: int  # failure lines: the node id of the client's SuperNode
    cause: str  # failure lines: why (an error reply, a reply that fails the protocol, no reply)
    attempt: int  # the try of the round's train phase (0 first; fed.round_retries more)


_HINTS = typing.get_type_hints(MetricLine)


def _check(key: str, value: Any, where: str) -> Any:
    kinds = typing.get_args(_HINTS[key]) or (_HINTS[key],)
    got = match_scalar(value, kinds)
    if got is not NO_MATCH:
        return got
    names = {int: "an integer", float: "a number", str: "a string"}
    expected = " or ".join(names.get(k, "null") for k in kinds)
    raise FedtuneError(f"{where}: {key!r} must be {expected}, got {value!r}")


def parse_line(text: str, where: str) -> MetricLine:
    """One JSON line as a :class:`MetricLine`; keys this version does not know are dropped."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise FedtuneError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(raw, dict):
        raise FedtuneError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    return typing.cast(MetricLine, {k: _check(k, v, where) for k, v in raw.items() if k in _HINTS})


def line_from_reply(server_round: int, phase: str, reply: Any, **extra: Any) -> MetricLine:
    """A client's line from its reply (a protocol dataclass): every field the line type knows."""
    fields = {f.name: getattr(reply, f.name) for f in dataclasses.fields(reply)}
    line: dict[str, Any] = {"round": server_round, "phase": phase, "client": fields.pop("partition_id")}
    line.update({k: v for k, v in fields.items() if k in _HINTS and v is not None})
    line.update(extra)
    return typing.cast(MetricLine, line)


def server_line(server_round: int, clients: list[MetricLine], seconds: float, **values: Any) -> MetricLine:
    """A round's server line: byte totals over its client lines, and the round's own values."""
    line: dict[str, Any] = {
        "round": server_round,
        "phase": "server",
        "client": None,
        "bytes_up": sum(c.get("bytes_up", 0) for c in clients),
        "bytes_down": sum(c.get("bytes_down", 0) for c in clients),
        "seconds": seconds,
    }
    line.update({k: v for k, v in values.items() if v is not None})
    return typing.cast(MetricLine, line)


def failure_line(server_round: int, phase: str, node: int, client: int | None, cause: str) -> MetricLine:
    """The line of a client that failed in ``phase``: its node, partition id (if known) and cause."""
    return {
        "round": server_round,
        "phase": phase,
        "event": "failure",
        "node": node,
        "client": client,
        "cause": cause,
    }
