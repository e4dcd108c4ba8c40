"""`fedtune judge` against fedtune's own OpenAI-compatible server, SmolLM2 as the judge, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from eval.answers import write_answers
from helpers import finished_tiny_run, run_cli
from loopback import free_port

pytestmark = pytest.mark.slow


def test_judge_with_smollm2_behind_fedtune_serve(capsys, tmp_path: Path) -> None:
    judge_run, _ = finished_tiny_run(tmp_path / "judge", config="configs/demo.toml")  # SmolLM2
    run, _ = finished_tiny_run(tmp_path / "run")
    write_answers(run, ["Paris is the capital of France.", "I do not know."])
    port = free_port()
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        "-m",
        "fedtune",
        "serve",
        str(judge_run.path),
        "--port",
        str(port),
        "--max-tokens",
        "96",
        "--max-prompt-tokens",  # a judge prompt is longer than the demo's max_source_length
        "2048",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "fedtune serve exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "fedtune serve did not answer /health"
            time.sleep(0.5)
        args = ["judge", str(run.path), "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "base",
                "--max-tokens", "96", "--cache", str(tmp_path / "cache"), "--concurrency", "2",
                "--follow-up"]  # fmt: skip
        code, out, err = run_cli(capsys, *args)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert code == 0, err
    result = json.loads(run.judge_single_file.read_text())
    counts = result["counts"]
    assert counts["requests"] == 2 and counts["failed"] == 0
    # a 135M judge forgets the format; continued from "Rating: [[" it states a grade (or copies
    # the instruction's "N": malformed still)
    assert counts["followed_up"] == 2 and counts["graded"] >= 1, result["items"]
    assert all(isinstance(i["rationale"], str) and i["rationale"] for i in result["items"])
    assert "mean score" in out
