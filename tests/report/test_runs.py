"""Tests for fedtune.report.runs against the hand-made run in conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.errors import FedtuneError
from fedtune.report.runs import (
    ClientLoss,
    RunTotals,
    bytes_per_round,
    client_eval_curves,
    loss_table,
    read_metrics,
    run_totals,
    server_curve,
)


def test_read_metrics_keeps_known_keys(run_dir: Path) -> None:
    records = read_metrics(run_dir)
    assert len(records) == 10  # the blank line is skipped
    assert records[0] == {
        "round": 0, "phase": "evaluate", "client": 0, "eval_loss": 2.5, "num_examples": 5,
        "bytes_up": 10, "bytes_down": 100, "seconds": 0.5,
    }  # fmt: skip
    assert "note" not in records[8]
    assert records[5]["client"] is None


def test_loss_table(run_dir: Path) -> None:
    # client 0: round 0 -> round 2; client 1 skips round 1; client 2 has one evaluation only
    assert loss_table(read_metrics(run_dir)) == [
        ClientLoss(0, 2.5, 1.5),
        ClientLoss(1, 3.0, 2.25),
        ClientLoss(2, 4.0, 4.0),
    ]


def test_client_eval_curves(run_dir: Path) -> None:
    assert client_eval_curves(read_metrics(run_dir)) == {
        0: [(0, 2.5), (1, 2.0), (2, 1.5)],
        1: [(0, 3.0), (2, 2.25)],
        2: [(2, 4.0)],
    }


def test_server_curves(run_dir: Path) -> None:
    records = read_metrics(run_dir)
    assert server_curve(records, "train_loss") == [(1, 2.3), (2, 1.9)]
    assert server_curve(records, "eval_loss") == [(2, 1.75)]  # round 1 had no server eval


def test_bytes_and_totals(run_dir: Path) -> None:
    records = read_metrics(run_dir)
    # round 0 has no server line: 10 + 10 up and 100 + 100 down from its client lines
    assert bytes_per_round(records) == {0: (20, 200), 1: (2000, 2000), 2: (2000, 2000)}
    assert run_totals(records) == RunTotals(rounds=2, bytes_up=4020, bytes_down=4200, seconds=22.5)


def test_empty_metrics(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("", encoding="utf-8")
    records = read_metrics(tmp_path)
    assert records == []
    assert loss_table(records) == []
    assert run_totals(records) == RunTotals(rounds=0, bytes_up=0, bytes_down=0, seconds=0.0)


def test_missing_metrics(tmp_path: Path) -> None:
    with pytest.raises(FedtuneError, match=r"metrics\.jsonl: not found"):
        read_metrics(tmp_path)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ('{"round": 1,', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"round": "1"}', "'round' must be an integer"),
        ('{"eval_loss": "low"}', "'eval_loss' must be a number"),
        ('{"client": 1.5}', "'client' must be an integer or null"),
        ('{"bytes_up": true}', "'bytes_up' must be an integer"),
    ],
)
def test_bad_line_names_its_number(tmp_path: Path, bad: str, why: str) -> None:
    good = '{"round": 0, "phase": "evaluate", "client": 0, "eval_loss": 1.0}'
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n\n{bad}\n{good}\n", encoding="utf-8")
    with pytest.raises(FedtuneError, match=rf"metrics\.jsonl:3: {why}"):
        read_metrics(tmp_path)
