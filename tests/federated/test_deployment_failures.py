"""`flwr run` against real SuperNodes on loopback when some of them fail.

(a) a SuperNode whose data file is missing is left out at discovery and the run completes on
the others; (b) fewer SuperNodes than partitions: a clear error after ``fed.wait_timeout``,
no run directory, and ``flwr ls`` shows the run failed; (c) a ClientApp process killed
mid-round: the round completes on the others, the kill is one failure line; (d) the SuperLink
killed after round 1: ``resume-dir`` in a new deployment ends with the uninterrupted run's adapter.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopback import LoopbackDeployment

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# one round, no evaluation: each message starts a ClientApp process (~10 s of imports on 2 cores)
TINY = "fed.rounds=1 fed.evaluate_before=false fed.fraction_evaluate=0 fed.wait_timeout=120"


def flwr_run(dep: LoopbackDeployment, overrides: str, *, run_config: str = "") -> subprocess.Popen[str]:
    """``flwr run`` of the repository's app with configs/tiny.toml and ``overrides``, streaming.

    ``run_config`` replaces the whole ``--run-config`` (e.g. ``resume-dir='...'``).
    """
    env = dep.connect("loop", default=True)
    output = f"run.output_dir={dep.root / 'runs'}"
    run_config = run_config or f"config-file='configs/tiny.toml' overrides='{output} {overrides}'"
    return subprocess.Popen(
        [str(BIN / "flwr"), "run", str(REPO), "loop", "--run-config", run_config, "--stream"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str], dep: LoopbackDeployment, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return f"flwr run exited {proc.returncode}\n{out[-4000:]}\n{dep.diagnostics()}"


def metrics(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_supernode_with_a_missing_data_file_is_left_out(tmp_path: Path) -> None:
    nodes = [{}, {}, {"data-path": str(tmp_path / "missing.jsonl")}]
    with LoopbackDeployment(tmp_path, 3, node_config=nodes) as dep:
        context = finish(flwr_run(dep, f"partition.num_partitions=3 fed.round_timeout=150 {TINY}"), dep)

    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "state.json").read_text()) == {"last_round": 1}, context
    lines = metrics(run_dir)
    (left_out,) = [x for x in lines if x.get("event") == "failure"]
    assert left_out["phase"] == "discovery" and "missing.jsonl" in str(left_out["cause"]), context
    assert {x["client"] for x in lines if x["phase"] == "train" and "event" not in x} == {0, 1}, context
    assert "left out of the federation" in context and "missing.jsonl" in context
    assert (run_dir / "report" / "index.html").is_file(), context  # flwr run writes the report too
    assert "Client failures (1)" in (run_dir / "report" / "index.html").read_text()


def test_too_few_supernodes_is_a_clear_error_with_no_run_directory(tmp_path: Path) -> None:
    with LoopbackDeployment(tmp_path, 2) as dep:
        proc = flwr_run(dep, "partition.num_partitions=3 fed.rounds=1 fed.wait_timeout=5")
        context = finish(proc, dep, timeout=120)
        run_id = re.search(r"Successfully started run (\d+)", context)
        assert run_id is not None, context
        ls = subprocess.run(
            [str(BIN / "flwr"), "ls", "loop", "--run-id", run_id.group(1), "--format", "json"],
            env=dep.env("cli"),
            capture_output=True,
            text=True,
            timeout=60,
        )

    expected = (
        "fedtune run FAILED: 2 SuperNode(s) connected within fed.wait_timeout=5s, "
        "but partition.num_partitions=3 are needed"
    )
    assert expected in context
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), context
    assert '"finished:failed"' in ls.stdout, ls.stdout + ls.stderr  # what a script checks


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid``, from /proc."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            kids = (task / "children").read_text().split() if (task / "children").exists() else []
            found += [int(k) for k in kids]
            todo += [int(k) for k in kids]
    return found


DATA_LINE = "partition_id_to_indices"  # a ClientApp partitioning its data: it holds its message


def _clientapps_of(supernode: int) -> set[int]:
    """The ``flwr-clientapp`` processes under a SuperNode (one per message it runs)."""
    found = set()
    for pid in _children(supernode):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flwr-clientapp" in cmd:
            found.add(pid)
    return found


def test_a_clientapp_killed_mid_round_is_one_failure_and_the_round_completes(tmp_path: Path) -> None:
    # Prepare: 3 SuperNodes, a quorum of 2, no evaluation: node 2's next ClientApp after round 0 is
    # recorded runs its round-1 train. It is killed once it has taken its message and is loading
    # its data (its log line); killed any earlier, Flower starts another for the same message.
    overrides = f"partition.num_partitions=3 fed.min_train_replies=2 fed.round_timeout=120 {TINY}"
    killed, seen, loaded = None, set(), 0
    with LoopbackDeployment(tmp_path, 3) as dep:
        proc = flwr_run(dep, overrides)
        supernode, log = dep.procs[3].pid, dep.logs[3]  # [superlink, supernode-0, -1, -2]
        deadline = time.monotonic() + 240
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            apps, data = _clientapps_of(supernode), log.read_text(errors="replace").count(DATA_LINE)
            if not any((tmp_path / "runs").glob("*/state.json")):
                seen, loaded = seen | apps, data  # discovery's ClientApp, perhaps still exiting
            elif data > loaded and (fresh := apps - seen):
                killed = fresh.pop()
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.1)
        context = finish(proc, dep)

    # Assert: round 1 completed on clients 0 and 1; client 2's failure is one line
    assert killed is not None, context
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "state.json").read_text()) == {"last_round": 1}, context
    lines = metrics(run_dir)
    (failure,) = [x for x in lines if x.get("event") == "failure"]
    assert (failure["round"], failure["phase"], failure["client"]) == (1, "train", 2), context
    cause = str(failure["cause"])  # the SuperNode's reply for a ClientApp gone for 2 heartbeats (60 s)
    assert cause.startswith("error reply 8 (the ClientApp process died"), context
    assert {x["client"] for x in lines if x["phase"] == "train" and "event" not in x} == {0, 1}, context
    (server,) = [x for x in lines if x["phase"] == "server" and x["round"] == 1]
    assert server["num_clients"] == 2, context


def test_a_superlink_killed_after_round_1_resumes_to_the_same_final_adapter(tmp_path: Path) -> None:
    # Prepare: 2 SuperNodes, 2 rounds; an uninterrupted run to compare with
    overrides = f"partition.num_partitions=2 fed.rounds=2 {TINY.replace('fed.rounds=1 ', '')}"
    with LoopbackDeployment(tmp_path / "whole", 2) as dep:
        context = finish(flwr_run(dep, overrides), dep)
    (whole,) = (tmp_path / "whole" / "runs").iterdir()
    assert (whole / "final" / "adapter_model.safetensors").is_file(), context

    # Execute: the SuperLink (and the ServerApp under it) dies once round 1 is checkpointed ...
    with LoopbackDeployment(tmp_path / "cut", 2) as dep:
        proc = flwr_run(dep, overrides)
        state, deadline = tmp_path / "cut" / "runs", time.monotonic() + 300
        while time.monotonic() < deadline and not any(
            json.loads(p.read_text())["last_round"] >= 1 for p in state.glob("*/state.json")
        ):
            time.sleep(0.1)
        os.killpg(dep.procs[0].pid, signal.SIGKILL)  # the SuperLink's process group, as a host crash
        time.sleep(2)
        proc.kill()  # the CLI streaming from the dead SuperLink
        proc.communicate()
    (cut,) = state.iterdir()
    left = json.loads((cut / "state.json").read_text())
    # ... and a new SuperLink and SuperNodes continue it with resume-dir
    with LoopbackDeployment(tmp_path / "again", 2) as dep:
        context = finish(flwr_run(dep, "", run_config=f"resume-dir='{cut}'"), dep)

    # Assert: the resumed run ends with exactly the uninterrupted run's adapter
    assert left == {"last_round": 1} and not (tmp_path / "again" / "runs").exists(), context
    assert json.loads((cut / "state.json").read_text()) == {"last_round": 2}, context
    assert (cut / "final" / "adapter_model.safetensors").read_bytes() == (
        whole / "final" / "adapter_model.safetensors"
    ).read_bytes(), context
