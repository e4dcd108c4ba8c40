"""Progress of the round loop: a live bar in a terminal, one plain line per round elsewhere.

In a terminal the bar shows the rounds done and, within a round, the phase and how many
of the sampled clients have replied (round 0 evaluates every client before any training,
which takes a while on a real model). With output to a file or a CI log, each finished
round is one log line: its losses, clients and seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)


def round_summary(line: Mapping[str, Any], rounds: int) -> str:
    """One plain line for a finished round, from its ``metrics.jsonl`` server line."""
    parts = [f"round {line['round']}/{rounds}"]
    if "train_loss" in line:
        parts.append(f"train loss {line['train_loss']:.4f} ({line.get('num_clients', 0)} clients)")
    if "eval_loss" in line:
        parts.append(f"eval loss {line['eval_loss']:.4f}")
    if "epsilon" in line:
        parts.append(f"ε {line['epsilon']:.3g}")
    parts.append(f"{line['seconds']:.1f} s")
    return ", ".join(parts)


class RoundProgress:
    """``enabled``: show anything; a bar only when the console is a terminal, else lines to ``logger``."""

    def __init__(self, rounds: int, *, enabled: bool = True, logger: logging.Logger | None = None) -> None:
        self.rounds = rounds
        self.enabled = enabled
        self.logger = logger or log
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._round = 0
        self._loss = ""

    @contextmanager
    def running(self, done: int, console: Console | None = None) -> Iterator[RoundProgress]:
        """Show progress inside this block; ``done`` rounds are complete already."""
        console = console or Console(stderr=True)
        if self.enabled and console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]federated rounds"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} {task.description}"),
                TimeElapsedColumn(),
                console=console,
            )
            with self._bar:
                self._task = self._bar.add_task("", total=self.rounds, completed=done)
                yield self
            self._bar = None
        else:
            yield self

    def start_round(self, server_round: int) -> None:
        self._round = server_round

    def phase(self, phase: str, done: int, total: int) -> None:
        """``done`` of ``total`` sampled clients have replied in this phase."""
        if self._bar is not None and self._task is not None:
            note = f"round {self._round}: {phase} {done}/{total} clients"
            self._bar.update(self._task, description=f"{self._loss}  {note}".strip())

    def end_round(self, server_round: int, line: Mapping[str, Any]) -> None:
        key = "eval_loss" if "eval_loss" in line else "train_loss"
        self._loss = f"{key.split('_')[0]} {line[key]:.3f}" if key in line else ""
        if "epsilon" in line:
            self._loss += f"  ε {line['epsilon']:.3g}"
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=server_round, description=self._loss)
        elif self.enabled:
            self.logger.info("%s", round_summary(line, self.rounds))
