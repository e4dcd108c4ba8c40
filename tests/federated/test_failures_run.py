"""`fedtune run` in Flower's simulation when no client answers in time: a clean failure, then a resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import run_cli

pytestmark = pytest.mark.integration  # runs `fedtune run` through Flower's simulation (Ray), in-process


def test_a_round_below_its_quorum_fails_the_run_cleanly_and_resume_continues_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a phase deadline no client can meet (a tiny model's train call takes > 0.1 s), so every
    # reply of round 1 is missing: a real client failure, "no reply by the deadline"
    out = tmp_path / "runs"
    sets = [f"run.output_dir='{out}'", "fed.round_timeout=0.001", "fed.rounds=1", "run.report=false"]

    # Execute
    failed = run_cli(
        capsys,
        "run",
        "--config",
        "configs/tiny.toml",
        "--no-progress",
        *[x for s in sets for x in ("--set", s)],
    )
    (run,) = out.iterdir()
    state = json.loads((run / "state.json").read_text())
    config = (run / "config.toml").read_text()
    (run / "config.toml").write_text(config.replace("round_timeout = 0.001", "round_timeout = 600.0"))
    resumed = run_cli(capsys, "run", "--resume", str(run), "--no-progress")

    # Assert: exit 2 with one line naming the cause and the resume; round 0 kept; then complete
    code, _, err = failed  # stderr with its whitespace folded
    assert code == 2, err[-3000:]
    (error,) = re.findall(
        r"error: run FAILED after round 0 of 1: .*? continue with: fedtune run --resume \S+", err
    )
    assert "below the quorum of 1" in error and error.endswith(str(run))
    assert state["last_round"] == 0 and "no reply" not in state["failed"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    missing = [x for x in lines if x.get("event") == "failure" and x["round"] == 1]
    assert [x["client"] for x in missing] == [0, 1, 2], err[-3000:]
    assert all(x["cause"] == "no reply within fed.round_timeout=0.001s" for x in missing)
    assert resumed[0] == 0, resumed[2][-3000:]
    assert json.loads((run / "state.json").read_text()) == {"last_round": 1}
    assert (run / "final" / "adapter_model.safetensors").is_file()
