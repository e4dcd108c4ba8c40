"""A SuperLink and N SuperNodes on loopback, separate processes as on separate machines.

Each component runs in its own session (one process group, killed as a whole) with its
own ``FLWR_HOME`` (where Flower installs the FAB) and log under a root directory; the
SuperNodes learn their partition from ``--node-config``. A harness for
``tests/federated/test_deployment.py`` and ``bench/deployment.py`` (``import loopback`` with
``tests/`` on the path): ``with LoopbackDeployment(root, 2) as dep: env = dep.connect("x")``,
then ``flwr run APP x`` with ``env``.

With ``tls`` (see ``certificates.py``) every link is TLS: the SuperLink serves its one port
over HTTPS, SuperNodes and the CLI trust ``tls.ca_cert``. With ``node_keys`` as well, the
SuperLink runs with ``--enable-supernode-auth``: the harness registers each key's ``.pub``
with ``flwr supernode register`` from an administrator's CLI home (``<root>/admin``) before
it starts SuperNode ``i`` with ``--auth-supernode-private-key node_keys[i]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from certificates import TlsFiles
from fedtune.serve.process import free_port

log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr, flwr-clientapp
NodeValue = str | int | float | bool


def superlink_healthy(port: int, ca_cert: Path | None = None) -> bool:
    """Whether the SuperLink on ``127.0.0.1:port`` answers its ``/health`` endpoint.

    With ``ca_cert``, over HTTPS, trusting that CA (and checking the certificate names
    127.0.0.1, as the SuperNodes will).
    """
    scheme, context = ("https", ssl.create_default_context(cafile=ca_cert)) if ca_cert else ("http", None)
    try:
        with urllib.request.urlopen(
            f"{scheme}://127.0.0.1:{port}/health", timeout=1, context=context
        ) as response:
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
    tls
        The SuperLink's certificates; ``None`` runs everything ``--insecure``.
    node_keys
        SuperNode ``i``'s private key (OpenSSH, with ``<key>.pub`` beside it); turns on
        SuperNode authentication, which needs ``tls``.
    startup_timeout_s, stop_timeout_s
        Seconds for the SuperLink to answer ``/health``; from SIGTERM to SIGKILL.
    """

    def __init__(
        self,
        root: Path,
        num_nodes: int,
        *,
        node_config: Sequence[Mapping[str, NodeValue]] = (),
        tls: TlsFiles | None = None,
        node_keys: Sequence[Path] = (),
        startup_timeout_s: float = 30.0,
        stop_timeout_s: float = 15.0,
    ) -> None:
        if node_config and len(node_config) != num_nodes:
            raise ValueError(f"node_config has {len(node_config)} entries for {num_nodes} nodes")
        if node_keys and len(node_keys) != num_nodes:
            raise ValueError(f"node_keys has {len(node_keys)} entries for {num_nodes} nodes")
        if node_keys and tls is None:
            raise ValueError("node_keys (SuperNode authentication) needs tls")
        self.root = root
        self.num_nodes = num_nodes
        self.node_config = node_config
        self.tls = tls
        self.node_keys = node_keys
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.port = 0  # the SuperLink's, once started
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.node_ids: list[int] = []  # the SuperLink's ids of the registered keys, in order

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
        trust = f"root-certificates = {json.dumps(str(self.tls.ca_cert))}" if self.tls else "insecure = true"
        (flwr_home / "config.toml").write_text(
            f'{header}[superlink.{name}]\naddress = "127.0.0.1:{self.port}"\n{trust}\n'
        )
        return self.env(home)

    def flwr(self, *args: str, home: str = "admin", timeout_s: float = 60.0) -> dict[str, Any]:
        """``flwr ARGS... loopback --format json`` from ``<root>/<home>``; its JSON reply.

        For the administrator's commands (``supernode register KEY``, ``supernode ls``);
        ``home`` gets a ``[superlink.loopback]`` connection first.

        Raises
        ------
        RuntimeError
            The command failed or printed no JSON.
        """
        env = self.connect("loopback", home=home)
        cli = subprocess.run(
            [str(BIN / "flwr"), *args, "loopback", "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        try:
            reply = json.loads(cli.stdout)
        except json.JSONDecodeError:
            reply = None
        if cli.returncode != 0 or not isinstance(reply, dict) or not reply.get("success"):
            raise RuntimeError(f"flwr {' '.join(args)} exited {cli.returncode}:\n{cli.stdout}\n{cli.stderr}")
        return dict(reply)

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
        """Start the SuperLink, wait for its ``/health``, then register and start the SuperNodes.

        Raises
        ------
        RuntimeError
            The SuperLink exited or did not come up in time, or a key's registration
            failed; what was started is stopped.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        try:
            self._start_superlink()
            for i in range(self.num_nodes):
                extra = self.node_config[i] if self.node_config else {}
                key = self.node_keys[i] if self.node_keys else None
                if key is not None:
                    reply = self.flwr("supernode", "register", str(key.with_name(key.name + ".pub")))
                    self.node_ids.append(int(reply["node-id"]))
                config = {"partition-id": i, "num-partitions": self.num_nodes, **extra}
                self.start_supernode(f"supernode-{i}", config, key=key)
            log.info("%d SuperNodes started, logs in %s", self.num_nodes, self.root)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_superlink(self) -> None:
        tls = self.tls
        security = (
            [
                f"--ssl-ca-certfile={tls.ca_cert}",
                f"--ssl-certfile={tls.server_cert}",
                f"--ssl-keyfile={tls.server_key}",
            ]
            if tls
            else ["--insecure"]
        )
        if self.node_keys:
            security.append("--enable-supernode-auth")
        link = self._start(
            "superlink",
            "flower-superlink",
            *security,
            "--host=127.0.0.1",
            f"--port={self.port}",
            "--disable-runtime-dependency-installation",
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while not superlink_healthy(self.port, tls.ca_cert if tls else None):
            if link.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"SuperLink did not come up; see {self.root / 'superlink.log'}\n{self.diagnostics()}"
                )
            time.sleep(0.2)
        log.info("SuperLink up on 127.0.0.1:%d%s", self.port, " (TLS)" if tls else "")

    def start_supernode(
        self, name: str, config: Mapping[str, NodeValue], *, key: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a SuperNode with ``--node-config`` ``config``, log ``<root>/<name>.log``.

        ``key`` is its ``--auth-supernode-private-key``. :meth:`start` starts the
        ``num_nodes`` SuperNodes; a test calls this for one more (e.g. one whose key the
        SuperLink does not know).
        """
        security = [f"--root-certificates={self.tls.ca_cert}"] if self.tls else ["--insecure"]
        if key is not None:
            security.append(f"--auth-supernode-private-key={key}")
        return self._start(
            name,
            "flower-supernode",
            *security,
            f"--superlink=127.0.0.1:{self.port}",
            f"--port={free_port()}",  # the SuperNode's own runtime API for its ClientApps
            "--node-config=" + " ".join(f"{k}={_toml(v)}" for k, v in config.items()),
        )

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
