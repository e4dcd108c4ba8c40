"""Read a run directory's ``metrics.jsonl`` and reduce it to tables (pure, no plotting).

One JSON object per line, of the type :class:`~fedtune.metrics.MetricLine` that the round
loop writes (checked key by key against it; keys it does not know are dropped).
``phase`` is ``"train"`` or ``"evaluate"`` for one client's result and ``"server"`` for a
round's aggregate; round 0 evaluates the starting adapter before any training.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from fedtune.errors import FedtuneError
from fedtune.metrics import MetricLine, parse_line
from fedtune.rundir import RunDir

__all__ = [
    "ClientLoss",
    "MetricRecord",
    "RunTotals",
    "bytes_per_round",
    "client_eval_curves",
    "loss_table",
    "read_metrics",
    "run_totals",
    "server_curve",
]


MetricRecord = MetricLine  # one line of metrics.jsonl: the type the round loop writes


class ClientLoss(NamedTuple):
    """One client's eval loss at its first and at its last evaluated round."""

    client: int
    before: float
    after: float


@dataclass(frozen=True)
class RunTotals:
    """Whole-run sums; ``rounds`` is the last round number (round 0 trains nothing)."""

    rounds: int
    bytes_up: int
    bytes_down: int
    seconds: float


def read_metrics(run_dir: Path | str) -> list[MetricRecord]:
    """Read ``run_dir/metrics.jsonl``; blank lines are skipped, unknown keys dropped.

    Raises
    ------
    FedtuneError
        The file is missing, or ``metrics.jsonl:LINE`` is not a JSON object of the schema.
    """
    path = RunDir(run_dir).metrics_file
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FedtuneError(f"{path}: not found (is {run_dir} a fedtune run directory?)") from None
    return [parse_line(text, f"{path}:{n}") for n, text in enumerate(lines, start=1) if text.strip()]


def _client_evals(records: Iterable[MetricRecord]) -> dict[int, dict[int, float]]:
    """``{client: {round: eval_loss}}`` from per-client evaluate lines."""
    evals: dict[int, dict[int, float]] = defaultdict(dict)
    for r in records:
        client = r.get("client")
        if r.get("phase") == "evaluate" and client is not None and "round" in r and "eval_loss" in r:
            evals[client][r["round"]] = r["eval_loss"]
    return evals


def client_eval_curves(records: Iterable[MetricRecord]) -> dict[int, list[tuple[int, float]]]:
    """Per client, ``(round, eval_loss)`` pairs in round order."""
    return {c: sorted(by_round.items()) for c, by_round in sorted(_client_evals(records).items())}


def loss_table(records: Iterable[MetricRecord]) -> list[ClientLoss]:
    """Per client (ascending), eval loss at its first and at its last evaluated round."""
    return [
        ClientLoss(client, curve[0][1], curve[-1][1]) for client, curve in client_eval_curves(records).items()
    ]


def server_curve(
    records: Iterable[MetricRecord],
    key: Literal["train_loss", "eval_loss", "epsilon", "epsilon_rdp", "epsilon_pld"],
) -> list[tuple[int, float]]:
    """``(round, value)`` of ``key`` on the server lines that have it, in round order."""
    points: dict[int, float] = {}
    for r in records:
        value = r.get(key)
        if r.get("phase") == "server" and "round" in r and value is not None:
            points[r["round"]] = value
    return sorted(points.items())


def bytes_per_round(records: Iterable[MetricRecord]) -> dict[int, tuple[int, int]]:
    """``{round: (bytes_up, bytes_down)}``.

    A round's server line holds its totals; a round without one (round 0, which only
    evaluates) sums its client lines instead.
    """
    server: dict[int, tuple[int, int]] = {}
    clients: dict[int, tuple[int, int]] = {}
    for r in records:
        if "round" not in r:
            continue
        up, down = r.get("bytes_up", 0), r.get("bytes_down", 0)
        if r.get("phase") == "server":
            server[r["round"]] = (up, down)
        else:
            old_up, old_down = clients.get(r["round"], (0, 0))
            clients[r["round"]] = (old_up + up, old_down + down)
    return dict(sorted((clients | server).items()))


def run_totals(records: Iterable[MetricRecord]) -> RunTotals:
    """Sum bytes over :func:`bytes_per_round` and seconds over the server lines."""
    records = list(records)
    per_round = bytes_per_round(records)
    return RunTotals(
        rounds=max((r["round"] for r in records if "round" in r), default=0),
        bytes_up=sum(up for up, _ in per_round.values()),
        bytes_down=sum(down for _, down in per_round.values()),
        seconds=sum(r.get("seconds", 0.0) for r in records if r.get("phase") == "server"),
    )


def failure_lines(records: Iterable[MetricRecord]) -> list[MetricRecord]:
    """The lines of clients that failed (``event`` ``"failure"``), in file order."""
    return [r for r in records if r.get("event") == "failure"]
