"""A SuperLink and N SuperNodes on loopback, separate processes as on separate machines.

Each component runs in its own session (one process group, killed as a whole) with its
own ``FLWR_HOME`` (where Flower installs the FAB) and log under a root directory; the
SuperNodes learn their partition from ``--node-config``. A harness for
``tests/federated/test_deployment.py`` and ``bench/deployment.py`` (``import loopback`` with
``tests/`` on the path): ``with LoopbackDeployment(root, 2) as dep: env = dep.connect("x")``,
then ``flwr run APP x`` with ``env``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr, flwr-clientapp
NodeValue = str | int | float | bool


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def superlink_healthy(port: int) -> bool:
    """Whether the SuperLink on ``127.0.0.1:port`` answers its ``/health`` endpoint."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """This process's environment for a Flower process with its own ``FLWR_HOME``.

    Offline, no telemetry or update checks, no runtime dependency installation (else
    uv syncs CUDA torch), and this interpreter's ``bin`` first on ``PATH`` so that the
    SuperLink and SuperNodes find ``flower-superexec`` and ``flwr-clientapp``.
    """
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def _toml(value: NodeValue) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower()  # a TOML literal


def _tail(path: Path, lines: int) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:])


class LoopbackDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on free loopback ports, as a context manager.

    Parameters
    ----------
    root
        Directory for the logs (``superlink.log``, ``supernode-<i>.log``) and each
        component's ``FLWR_HOME`` (``<root>/<name>``); also the processes' working directory.
    num_nodes
        SuperNode ``i`` gets ``partition-id=i num-partitions=num_nodes``.
    node_config
        Extra ``--node-config`` entries per SuperNode (e.g. ``data-path``, ``state-dir``);
        entry ``i`` goes to SuperNode ``i``.
    startup_timeout_s, stop_timeout_s
        Seconds for the SuperLink to answer ``/health``; from SIGTERM to SIGKILL.
    """

    def __init__(
        self,
        root: Path,
        num_nodes: int,
        *,
        node_config: Sequence[Mapping[str, NodeValue]] = (),
        startup_timeout_s: float = 30.0,
        stop_timeout_s: float = 15.0,
    ) -> None:
        if node_config and len(node_config) != num_nodes:
            raise ValueError(f"node_config has {len(node_config)} entries for {num_nodes} nodes")
        self.root = root
        self.num_nodes = num_nodes
        self.node_config = node_config
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.port = 0  # the SuperLink's, once started
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def env(self, home: str) -> dict[str, str]:
        """The environment of a Flower process whose ``FLWR_HOME`` is ``<root>/<home>``."""
        return flwr_env(self.root / home)

    def connect(self, name: str, *, home: str = "cli", default: bool = False) -> dict[str, str]:
        """Write ``[superlink.<name>]`` to ``<root>/<home>/config.toml``; the env for ``flwr``.

        ``name`` is the second argument of ``flwr run APP NAME``; ``default`` also makes it
        ``[superlink] default``. Returns :meth:`env` of ``home``.
        """
        flwr_home = self.root / home
        flwr_home.mkdir(parents=True, exist_ok=True)
        header = f'[superlink]\ndefault = "{name}"\n\n' if default else ""
        (flwr_home / "config.toml").write_text(
            f'{header}[superlink.{name}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        return self.env(home)

    def diagnostics(self, lines: int = 30) -> str:
        """The last ``lines`` lines of every component's log, for assertion messages."""
        return "\n".join(_tail(path, lines) for path in self.logs)

    def _start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        path = self.root / f"{name}.log"
        with path.open("wb") as out:
            proc = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                cwd=self.root,
                env=self.env(name),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one process group per component, killed as a whole
            )
        self.procs.append(proc)
        self.logs.append(path)
        log.debug("started %s (pid %d), log %s", name, proc.pid, path)
        return proc

    def start(self) -> LoopbackDeployment:
        """Start the SuperLink, wait for its ``/health``, then start the SuperNodes.

        Raises
        ------
        RuntimeError
            The SuperLink exited or did not come up in time; what was started is stopped.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        try:
            link = self._start(
                "superlink",
                "flower-superlink",
                "--insecure",
                "--host=127.0.0.1",
                f"--port={self.port}",
                "--disable-runtime-dependency-installation",
            )
            deadline = time.monotonic() + self.startup_timeout_s
            while not superlink_healthy(self.port):
                if link.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"SuperLink did not come up; see {self.root / 'superlink.log'}\n{self.diagnostics()}"
                    )
                time.sleep(0.2)
            log.info("SuperLink up on 127.0.0.1:%d", self.port)
            for i in range(self.num_nodes):
                extra = self.node_config[i] if self.node_config else {}
                config = {"partition-id": i, "num-partitions": self.num_nodes, **extra}
                self._start(
                    f"supernode-{i}",
                    "flower-supernode",
                    "--insecure",
                    f"--superlink=127.0.0.1:{self.port}",
                    f"--port={free_port()}",  # the SuperNode's own runtime API for its ClientApps
                    "--node-config=" + " ".join(f"{k}={_toml(v)}" for k, v in config.items()),
                )
            log.info("%d SuperNodes started, logs in %s", self.num_nodes, self.root)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM every component's process group; SIGKILL those still up after the timeout.

        The SuperLink and SuperNodes stop the SuperExec and App processes they started
        (those watch their parent's pid); the group kill covers what is in theirs.
        """
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, self.stop_timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> LoopbackDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
