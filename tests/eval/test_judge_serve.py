"""`fedtune judge` against fedtune's own OpenAI-compatible server, SmolLM2 as the judge, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.answers import write_answers
from fedtune.serve.process import served
from helpers import finished_tiny_run, run_cli

pytestmark = pytest.mark.slow


def test_judge_with_smollm2_behind_fedtune_serve(capsys, tmp_path: Path) -> None:
    judge_run, _ = finished_tiny_run(tmp_path / "judge", config="configs/demo.toml")  # SmolLM2
    run, _ = finished_tiny_run(tmp_path / "run")
    write_answers(run, ["Paris is the capital of France.", "I do not know."])
    limits = ("--max-tokens", "96", "--max-prompt-tokens", "2048")  # a judge prompt is longer than
    with served([judge_run.path], *limits, wait_s=180) as url:  # the demo's max_source_length
        args = ["judge", str(run.path), "--base-url", url, "--model", "base", "--max-tokens", "96",
                "--cache", str(tmp_path / "cache"), "--concurrency", "2", "--follow-up"]  # fmt: skip
        code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    result = json.loads(run.judge_single_file.read_text())
    counts = result["counts"]
    assert counts["requests"] == 2 and counts["failed"] == 0
    # a 135M judge forgets the format; continued from "Rating: [[" it states a grade (or copies
    # the instruction's "N": malformed still)
    assert counts["followed_up"] == 2 and counts["graded"] >= 1, result["items"]
    assert all(isinstance(i["rationale"], str) and i["rationale"] for i in result["items"])
    assert "mean score" in out
