"""A small hand-made run directory shared by the report tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Three clients, rounds 0..2. Client 1 skips evaluation in round 1, client 2 is only
# evaluated in round 2. Server train_loss of round 1 is example-weighted:
# (2.2 * 30 + 2.6 * 10) / 40 = 2.3.
RECORDS: list[dict[str, object]] = [
    {
        "round": 0,
        "phase": "evaluate",
        "client": 0,
        "eval_loss": 2.5,
        "num_examples": 5,
        "bytes_up": 10,
        "bytes_down": 100,
        "seconds": 0.5,
    },
    {
        "round": 0,
        "phase": "evaluate",
        "client": 1,
        "eval_loss": 3.0,
        "num_examples": 5,
        "bytes_up": 10,
        "bytes_down": 100,
        "seconds": 0.5,
    },
    {
        "round": 1,
        "phase": "train",
        "client": 0,
        "train_loss": 2.2,
        "num_examples": 30,
        "bytes_up": 1000,
        "bytes_down": 1000,
        "seconds": 4.0,
    },
    {
        "round": 1,
        "phase": "train",
        "client": 1,
        "train_loss": 2.6,
        "num_examples": 10,
        "bytes_up": 1000,
        "bytes_down": 1000,
        "seconds": 3.0,
    },
    {"round": 1, "phase": "evaluate", "client": 0, "eval_loss": 2.0, "perplexity": 7.39},
    {
        "round": 1,
        "phase": "server",
        "client": None,
        "train_loss": 2.3,
        "num_clients": 2,
        "bytes_up": 2000,
        "bytes_down": 2000,
        "seconds": 10.0,
    },
    {"round": 2, "phase": "evaluate", "client": 0, "eval_loss": 1.5},
    {"round": 2, "phase": "evaluate", "client": 1, "eval_loss": 2.25},
    {"round": 2, "phase": "evaluate", "client": 2, "eval_loss": 4.0, "note": "unknown keys are dropped"},
    {
        "round": 2,
        "phase": "server",
        "client": None,
        "train_loss": 1.9,
        "eval_loss": 1.75,
        "num_clients": 3,
        "bytes_up": 2000,
        "bytes_down": 2000,
        "seconds": 12.5,
    },
]

CONFIG = '[model]\nname = "tiny <test> & co"\n\n[federated]\nrounds = 2\n'


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    lines = [json.dumps(r) for r in RECORDS]
    lines.insert(3, "")  # blank lines are skipped
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "config.toml").write_text(CONFIG, encoding="utf-8")
    return tmp_path
