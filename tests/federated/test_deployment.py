"""`flwr run` of the app against a real SuperLink and two SuperNodes on loopback.

Everything runs as separate processes, as on separate machines: each has its own
FLWR_HOME (where Flower installs the FAB), the SuperNodes learn their partition from
``--node-config``, and the run config reaches the ServerApp through ``flwr run
--run-config``. The tiny config keeps the whole deployment to well under a minute on
two cores; most of it is Python start-up and imports, once per message.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEADLINE_S = 150.0  # the run itself takes ~30 s on 2 cores; slack for a loaded machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class Deployment:
    """Processes started in their own sessions, logging to files under ``root``."""

    root: Path
    superlink_port: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def env(self, home: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            FLWR_HOME=str(self.root / home),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # else uv syncs CUDA torch
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # flower-superexec, flwr-clientapp
        )
        return env

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                cwd=self.root,
                env=self.env(name),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one process group per component, killed as a whole
            )
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def diagnostics(self) -> str:
        return "\n".join(_tail(log) for log in self.logs)

    def stop(self) -> None:
        # SuperLink and SuperNode stop the SuperExec and App processes they started
        # (those watch their parent's pid); the group kill covers what is in ours.
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A SuperLink and two SuperNodes (partitions 0 and 1 of 2) on free loopback ports."""
    dep = Deployment(tmp_path, superlink_port=_free_port())
    try:
        link = dep.start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--host=127.0.0.1",
            f"--port={dep.superlink_port}",
            "--disable-runtime-dependency-installation",
        )
        deadline = time.monotonic() + 30
        while not _healthy(dep.superlink_port):
            if link.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"SuperLink did not come up\n{dep.diagnostics()}")
            time.sleep(0.2)
        for pid in (0, 1):
            dep.start(
                f"supernode-{pid}",
                "flower-supernode",
                "--insecure",
                f"--superlink=127.0.0.1:{dep.superlink_port}",
                f"--port={_free_port()}",  # the SuperNode's own runtime API for its ClientApps
                f"--node-config=partition-id={pid} num-partitions=2",
            )
        yield dep
    finally:
        dep.stop()


def test_flwr_run_trains_one_round_across_two_supernodes(deployment: Deployment) -> None:
    # Prepare: the CLI's SuperLink connection, in its own FLWR_HOME
    home = deployment.root / "cli"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "deployment"\n\n'
        f'[superlink.deployment]\naddress = "127.0.0.1:{deployment.superlink_port}"\ninsecure = true\n'
    )
    out_dir = deployment.root / "runs"
    overrides = f"partition.num_partitions=2 fed.rounds=1 fed.timeout=120 run.output_dir={out_dir}"

    # Execute: --stream follows the run's log until it ends
    cli = subprocess.run(
        [
            str(BIN / "flwr"),
            "run",
            str(REPO),
            "deployment",
            "--run-config",
            f"config-file='configs/tiny.toml' overrides='{overrides}'",
            "--stream",
        ],
        env=deployment.env("cli"),
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )

    # Assert: one complete round and the final adapter in the run directory
    context = f"flwr run exited {cli.returncode}\n{cli.stdout[-3000:]}\n{cli.stderr[-3000:]}\n"
    context += deployment.diagnostics()
    runs = list(out_dir.glob("*/state.json"))
    assert len(runs) == 1, context
    run_dir = runs[0].parent
    assert json.loads(runs[0].read_text())["last_round"] == 1, context
    assert (run_dir / "final" / "adapter_model.safetensors").is_file(), context
    clients = {
        line["client"]
        for line in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if line["round"] == 1 and line["phase"] == "train"
    }
    assert clients == {0, 1}, context
