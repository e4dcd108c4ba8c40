"""A long-lived node worker beside a SuperNode: the model and the client's data stay warm.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message, and each would
import torch, load the base model and tokenise the client's data again. ``fedtune node``
runs one process that does this once and serves every message of every run: the ClientApp
(:mod:`~fedtune.federated.client_app`) forwards each message to it and returns its reply.
The worker runs the very handlers the ClientApp would run in-process
(:mod:`~fedtune.federated.client_work`), so replies are the same bit for bit.

The channel is a Unix socket in the worker's folder (mode 0700, this user's), and every
connection must pass ``multiprocessing.connection``'s HMAC challenge with the folder's
``token`` (mode 0600, fresh at every start) before anything is read: nothing else on the
host can drive the worker. A bad message gets an error reply and the worker goes on.

This module imports neither torch nor the handlers until a worker needs them: the ClientApp
process that only forwards stays as light as a bare Flower app.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import stat
import time
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from fedtune.errors import FedtuneError
from fedtune.federated.protocol.node import (
    WorkReply,
    WorkRequest,
    fallback_said,
    note_fallback_said,
)

log = logging.getLogger(__name__)
DEFAULT_DIR = Path.home() / ".cache" / "fedtune" / "node"
NODE_CONFIG_KEY = "worker"  # the SuperNode's --node-config key naming the worker's folder
WAIT_KEY = "worker-wait"  # seconds to wait for a worker that is not listening (restarting), default:
WAIT_DEFAULT = 15.0
_POLL = 0.25


@dataclass(frozen=True)
class WorkerDir:
    """A worker's folder: its socket and its token."""

    path: Path

    @property
    def socket(self) -> Path:
        return self.path / "worker.sock"

    @property
    def token_file(self) -> Path:
        return self.path / "token"

    def check_owner(self) -> None:
        """Refuse a folder, socket or token that another user owns or others may write (or a long path)."""
        if len(os.fsencode(self.socket)) > 100:  # a Unix socket's path has room for about 107 bytes
            raise FedtuneError(f"node worker: folder {self.path} is too long a path for a Unix socket")
        for item in (self.path, self.socket, self.token_file):
            if not item.exists():
                continue
            st = item.stat()
            if st.st_uid != os.getuid():
                raise FedtuneError(f"node worker: {item} is owned by uid {st.st_uid}, not this user")
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise FedtuneError(f"node worker: {item} is writable by other users")

    def token(self) -> bytes:
        try:
            return self.token_file.read_bytes().strip()
        except FileNotFoundError:
            raise FedtuneError(f"node worker: no token file {self.token_file}") from None

    def prepare(self) -> bytes:
        """Create the folder (0700) and a fresh token (0600); refuse a folder a live worker serves.

        A socket nobody answers on (a crashed worker's) is removed.
        """
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.check_owner()
        os.chmod(self.path, 0o700)
        if self.socket.exists():
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(self.socket))
                except OSError:
                    self.socket.unlink()
                else:
                    raise FedtuneError(f"node worker: another worker already serves {self.socket}")
        token = secrets.token_hex(32).encode()
        tmp = self.token_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(token)
        os.replace(tmp, self.token_file)
        return token


# -- the ClientApp's side ---------------------------------------------------------
def forward(handler: str, msg: Message, context: Context) -> Message | None:
    """``msg`` worked by the node's worker, or None when this node has none running (work in-process).

    A node without ``worker`` in its node config has no worker. A worker that is not listening
    (restarting after a crash) is waited for up to ``worker-wait`` seconds (node config, 15 by
    default); then working without it is said once per run and the ClientApp works
    in-process. After that, each message tries the worker once without waiting (a worker that
    came back is used again). A folder owned by
    another user, a token the worker refuses, or a worker that dies mid-message raise:
    Flower answers the server with an error reply, and the server leaves this client out.
    """
    path = context.node_config.get(NODE_CONFIG_KEY)
    if not path:
        return None
    where = WorkerDir(Path(str(path)).expanduser())
    where.check_owner()
    # once this run has fallen back, a missing worker costs one try per message, not the wait
    wait = 0.0 if fallback_said(context) else _wait_seconds(context)
    conn = _connect(where, wait, context)
    if conn is None:
        return None
    with conn:
        request = WorkRequest(handler, msg, dict(context.node_config), context.run_id)
        try:
            conn.send_bytes(b"".join(_frame(*request.to_frames())))
            reply = WorkReply.from_frames(*_unframe(conn.recv_bytes()))
        except (EOFError, ConnectionResetError, BrokenPipeError):
            raise FedtuneError(
                f"node worker at {where.socket} died while working a {handler} message"
            ) from None
    return reply.answering(msg)


def _wait_seconds(context: Context) -> float:
    raw = context.node_config.get(WAIT_KEY, WAIT_DEFAULT)
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 0:
        raise FedtuneError(f"node config {WAIT_KEY!r}: expected seconds >= 0, got {raw!r}")
    return float(raw)


def _connect(where: WorkerDir, wait: float, context: Context) -> Connection | None:
    """A connection to the worker, waiting up to ``wait`` s for one that is not listening yet."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return Client(str(where.socket), "AF_UNIX", authkey=where.token())
        except AuthenticationError:
            raise FedtuneError(
                f"node worker at {where.socket} refused {where.token_file}: token mismatch"
            ) from None
        except (FileNotFoundError, ConnectionRefusedError, FedtuneError) as err:
            if time.monotonic() >= deadline:
                _say_fallback(context, where, "stale socket" if where.socket.exists() else str(err))
                return None
        time.sleep(_POLL)


def _say_fallback(context: Context, where: WorkerDir, why: str) -> None:
    if not fallback_said(context):
        logging.getLogger("flwr").warning(
            "fedtune: no node worker at %s (%s); working in the ClientApp process "
            "(start one with `fedtune node --dir %s`)",
            where.socket,
            why,
            where.path,
        )
        note_fallback_said(context)


def _frame(head: bytes, body: bytes) -> tuple[bytes, bytes, bytes]:
    return len(head).to_bytes(4, "big"), head, body


def _unframe(data: bytes) -> tuple[bytes, bytes]:
    size = int.from_bytes(data[:4], "big")
    return data[4 : 4 + size], data[4 + size :]


# -- the worker's side ------------------------------------------------------------
def work(data: bytes) -> WorkReply:
    """One request's reply; any exception becomes an error reply (the worker goes on)."""
    from fedtune.federated.client_work import handle

    message_id = ""
    try:
        request = WorkRequest.from_frames(*_unframe(data))
        message_id = request.message.metadata.message_id
        t0 = time.perf_counter()
        reply = handle(request.handler, request.message, request.context())
        log.info(
            "%s message of run %s worked in %.2f s",
            request.handler,
            request.run_id,
            time.perf_counter() - t0,
        )
        return WorkReply(message_id, content=reply.content)
    except Exception as err:  # a bad message must not end the worker
        log.warning("message %s failed: %s: %s", message_id or "?", type(err).__name__, err)
        return WorkReply(message_id, error=f"{type(err).__name__}: {err}")


def _serve_one(conn: Connection) -> None:
    with conn:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        reply = work(data)
        try:
            conn.send_bytes(b"".join(_frame(*reply.to_frames())))
        except OSError as err:  # the ClientApp went away (killed, timed out)
            log.warning("could not send the reply to message %s: %s", reply.message_id, err)


def serve(path: Path, *, preload: Any = None, ready: Path | None = None) -> None:
    """Serve messages on ``path``'s socket until SIGTERM / SIGINT; ``preload`` a Config to load first.

    The socket is bound before the model loads, so a message that comes meanwhile waits for
    the worker instead of loading a second copy in its ClientApp.
    """
    where = WorkerDir(path.expanduser())
    listener = Listener(str(where.socket), "AF_UNIX", authkey=where.prepare())
    os.chmod(where.socket, 0o600)
    bound = where.socket.stat().st_ino
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        listener.close()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if preload is not None:
            from fedtune.federated.client_work import preload as load

            load(preload)
        log.info("node worker serving on %s (pid %s)", where.socket, os.getpid())
        if ready is not None:
            ready.write_text(str(where.socket))
        while not stopping:
            _accept(listener, where, lambda: stopping)
    finally:
        with contextlib.suppress(OSError):  # this worker's socket only, never a successor's
            if where.socket.stat().st_ino == bound:
                where.socket.unlink()
        log.info("node worker stopped")


def _accept(listener: Listener, where: WorkerDir, stopping: Any) -> None:
    """Accept one connection (HMAC challenge first) and serve its message; a failed handshake is logged."""
    try:
        conn = listener.accept()
    except AuthenticationError:
        log.warning("refused a connection: it does not hold %s", where.token_file)
        return
    except (EOFError, ConnectionError) as err:  # the peer went away mid-handshake (killed, probing)
        log.warning("a connection closed during the handshake: %s", err)
        return
    except OSError:
        if stopping():
            return
        raise
    _serve_one(conn)
