"""Progress of the round loop: plain lines off a terminal, phase and clients within a round on one."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from fedtune.federated.progress import RoundProgress, round_summary

LINE = {
    "round": 2,
    "phase": "server",
    "train_loss": 1.23456,
    "num_clients": 3,
    "eval_loss": 1.5,
    "seconds": 4.25,
}


def test_round_summary() -> None:
    assert round_summary(LINE, 5) == "round 2/5, train loss 1.2346 (3 clients), eval loss 1.5000, 4.2 s"
    assert (
        round_summary({"round": 0, "eval_loss": 2.0, "seconds": 1.0}, 5)
        == "round 0/5, eval loss 2.0000, 1.0 s"
    )


def test_off_a_terminal_each_round_is_one_log_line(caplog) -> None:
    progress = RoundProgress(3, logger=logging.getLogger("test.progress"))
    with caplog.at_level(logging.INFO, "test.progress"), progress.running(1, Console(file=io.StringIO())):
        progress.start_round(2)
        progress.phase("train", 1, 3)  # no bar: nothing printed within the round
        progress.end_round(2, LINE)
    assert [r.getMessage() for r in caplog.records] == [round_summary(LINE, 3)]


def test_disabled_prints_nothing(caplog) -> None:
    progress = RoundProgress(3, enabled=False, logger=logging.getLogger("test.progress"))
    with caplog.at_level(logging.INFO, "test.progress"), progress.running(0, Console(file=io.StringIO())):
        progress.end_round(1, LINE)
    assert not caplog.records


def test_in_a_terminal_the_bar_shows_the_phase_and_clients_replied() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    progress = RoundProgress(3)
    with progress.running(0, console):
        progress.start_round(1)
        progress.phase("evaluate", 5, 8)
        assert progress._bar is not None
        task = progress._bar.tasks[0]
        assert task.description == "round 1: evaluate 5/8 clients" and task.completed == 0
        progress.end_round(1, LINE)
        assert progress._bar.tasks[0].completed == 1 and progress._bar.tasks[0].description == "eval 1.500"
