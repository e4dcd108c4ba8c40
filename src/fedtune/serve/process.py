"""``fedtune serve`` as a child process on loopback: started, waited for, stopped by its own PID.

For benches and tests that speak to a real server (the judge's local endpoint, the official
``openai`` client): :func:`served` yields the API root once ``/health`` answers.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

import fedtune
from fedtune.errors import FedtuneError

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on loopback now (the OS's choice)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextmanager
def served(run_dirs: Sequence[str | Path], *args: str, wait_s: float = 180.0) -> Iterator[str]:
    """``fedtune serve RUN_DIRS --host 127.0.0.1 --port P ARGS`` until the block ends.

    Yields the API root ``http://127.0.0.1:P/v1`` once ``/health`` answers. The child runs this
    fedtune's source (``PYTHONPATH``); a child that exits or does not answer within ``wait_s``
    raises :class:`FedtuneError` with the end of its stderr. On leaving, the child gets SIGTERM,
    then SIGKILL after 30 s; it also gets SIGTERM if this process dies first (Linux).
    """
    port = free_port()
    src = str(Path(fedtune.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "fedtune", "serve", *map(str, run_dirs), "--host", HOST, "--port", str(port)]
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(
            [*cmd, *args], env=env, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_die_with_parent
        )
        try:
            _wait_healthy(proc, port, wait_s, err)
            yield f"http://{HOST}:{port}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_PR_SET_PDEATHSIG = 1
# libc's prctl, looked up here in the parent: the child between fork and exec only calls it
# (no import or library loading there, which could block on a lock another thread held)
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent dies.

    So a parent killed before its ``finally`` (SIGKILL, an unhandled SIGTERM) leaves no server behind.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, wait_s: float, err: IO[bytes]) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        if proc.poll() is not None:
            raise FedtuneError(f"fedtune serve exited with status {proc.returncode}: {_tail(err)}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise FedtuneError(f"fedtune serve did not answer /health within {wait_s:.0f} s: {_tail(err)}")
        time.sleep(0.3)


def _tail(err: IO[bytes], chars: int = 2000) -> str:
    err.seek(0)
    return err.read().decode(errors="replace")[-chars:].strip() or "(no stderr)"
