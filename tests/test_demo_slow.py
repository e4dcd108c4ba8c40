"""The real thing: the SmolLM2 demo config, one round, held-out loss must fall."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_smollm2_demo_one_round_lowers_held_out_loss(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedtune",
            "run",
            "--config",
            "configs/demo.toml",
            "--no-progress",
            "--set",
            "fed.rounds=1",
            "--set",
            f"run.output_dir='{tmp_path}'",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    server = {
        r["round"]: r
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if r["phase"] == "server"
    }
    assert server[1]["eval_loss"] < server[0]["eval_loss"] - 0.1, server
