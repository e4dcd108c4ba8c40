"""``fedtune node`` workers for loopback SuperNodes: one per node, each in its own folder.

A harness for the deployment tests and ``bench/deployment.py`` (``import node_workers`` with
``tests/`` on the path)::

    with NodeWorkers(root, 2) as workers, LoopbackDeployment(root, 2, node_config=workers.node_config()):
        ...
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

BIN = Path(sys.executable).parent


class NodeWorkers:
    """``num_nodes`` workers under ``root/worker-<i>`` (logs ``root/worker-<i>.log``).

    ``config`` and ``overrides`` are passed to ``fedtune node`` so the model is loaded before
    the first message; ``env`` is the workers' environment (default: this process's).
    """

    def __init__(
        self,
        root: Path,
        num_nodes: int,
        *,
        config: str | None = None,
        overrides: Sequence[str] = (),
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 120.0,
    ) -> None:
        self.root, self.num_nodes = root, num_nodes
        self.args = ["--config", config, *(a for o in overrides for a in ("--set", o))] if config else []
        self.env = env
        self.startup_timeout_s = startup_timeout_s
        self.procs: list[subprocess.Popen[bytes]] = []

    def folder(self, i: int) -> Path:
        return self.root / f"worker-{i}"

    def node_config(self) -> list[dict[str, str]]:
        """The ``--node-config`` entries that point each SuperNode at its worker."""
        return [{"worker": str(self.folder(i))} for i in range(self.num_nodes)]

    def log(self, i: int) -> str:
        path = self.root / f"worker-{i}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        ready = self.root / f"worker-{i}.ready"
        ready.unlink(missing_ok=True)
        cmd = [str(BIN / "fedtune"), "node", "--dir", str(self.folder(i)), *self.args]
        cmd += ["--ready-file", str(ready)]
        with (self.root / f"worker-{i}.log").open("ab") as out:
            return subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

    def _wait_ready(self, i: int, deadline: float) -> None:
        while not (self.root / f"worker-{i}.ready").exists():
            if self.procs[i].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node worker {i} did not start:\n{self.log(i)[-3000:]}")
            time.sleep(0.2)

    def restart(self, i: int) -> None:
        """SIGKILL worker ``i`` (as a crash would) and start it again, as systemd's Restart= would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[i].pid, signal.SIGKILL)
        self.procs[i].wait()
        self.procs[i] = self._spawn(i)
        self._wait_ready(i, time.monotonic() + self.startup_timeout_s)

    def __enter__(self) -> NodeWorkers:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.procs = [self._spawn(i) for i in range(self.num_nodes)]
            deadline = time.monotonic() + self.startup_timeout_s
            for i in range(self.num_nodes):
                self._wait_ready(i, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def __exit__(self, *exc: object) -> None:
        self.stop()
