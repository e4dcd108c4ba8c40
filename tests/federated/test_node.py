"""The node worker (``fedtune node``): its channel, its folder's checks, replies as in-process work."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Client, Listener
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.federated import client_app, node
from fedtune.federated.protocol import Instruction, Job, TrainReply, instruction_message, read_reply
from fedtune.federated.protocol.node import WorkerError, WorkReply, WorkRequest, fallback_said
from fedtune.federated.protocol.wire import ProtocolError
from fedtune.federated.records import from_record, to_record
from fedtune.models.adapters import initial_adapter_state

BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for field in ("_run_id", "_node_id", "_task_id"):  # what Flower's runtime sets in its processes
        monkeypatch.setattr(TaskIdentity, field, 1)


def _train_message(server_round: int = 1):  # type: ignore[no-untyped-def]
    cfg = load_config("configs/tiny.toml", ["train.max_steps=2"])
    state = initial_adapter_state(cfg.model, seed=cfg.seed)
    adapter = to_record(state, "float32")
    inst = Instruction(job=Job.PLAIN, server_round=server_round, config=cfg, adapter=adapter)
    msg = instruction_message(inst, MessageType.TRAIN, 1)
    msg.metadata.__dict__["_message_id"] = f"m{server_round}"  # as the runtime assigns
    return msg


@pytest.fixture
def said(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """What the ClientApp says on Flower's logger (which may not propagate to the root logger)."""
    flwr_log, propagate = logging.getLogger("flwr"), logging.getLogger("flwr").propagate
    caplog.set_level(logging.WARNING, logger="flwr")  # the CLI quietens it to errors
    flwr_log.addHandler(caplog.handler)
    flwr_log.propagate = False  # each record once, whether or not it would reach the root logger
    yield caplog
    flwr_log.propagate = propagate
    flwr_log.removeHandler(caplog.handler)


def _context(**node: object) -> Context:
    return Context(7, 1, {"partition-id": 0, "num-partitions": 3, **node}, RecordDict(), {})


# -- the channel ------------------------------------------------------------------
def test_a_request_round_trips_through_its_frames() -> None:
    msg = _train_message()
    request = WorkRequest("train", msg, {"partition-id": 0}, run_id=7)
    back = WorkRequest.from_frames(*request.to_frames())
    assert (back.handler, back.node_config, back.run_id) == ("train", {"partition-id": 0}, 7)
    assert back.message.metadata.message_id == "m1"
    assert back.message.content["arrays"].keys() == msg.content["arrays"].keys()


@pytest.mark.parametrize(
    ("head", "error"),
    [
        (b"not json", "header is not JSON"),
        (b'{"protocol": 99, "handler": "train"}', "field 'protocol' is not 2"),
        (b'{"protocol": 2, "handler": "fit"}', "unknown handler 'fit'"),
        (b'{"protocol": 2, "handler": "train", "node-config": {}}', "body is not a Flower message"),
    ],
)
def test_a_malformed_request_is_refused_naming_what_is_wrong(head: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        WorkRequest.from_frames(head, b"\xff\x00garbage")


def test_a_reply_to_another_message_is_refused_and_an_error_reply_raises() -> None:
    msg = _train_message()
    with pytest.raises(ProtocolError, match="replied to message 'm2', not 'm1'"):
        WorkReply("m2", content=RecordDict()).answering(msg)
    with pytest.raises(WorkerError, match="ValueError: bad"):
        WorkReply.from_frames(*WorkReply("m1", error="ValueError: bad").to_frames()).answering(msg)


# -- the folder -------------------------------------------------------------------
def test_prepare_makes_a_private_folder_and_a_fresh_token(tmp_path: Path) -> None:
    where = node.WorkerDir(tmp_path / "w")
    first = where.prepare()
    assert oct(where.path.stat().st_mode & 0o777) == "0o700"
    assert oct(where.token_file.stat().st_mode & 0o777) == "0o600"
    assert where.token() == first and len(first) == 64
    assert where.prepare() != first  # every start: a new token


def test_a_folder_others_may_write_is_refused(tmp_path: Path) -> None:
    where = node.WorkerDir(tmp_path / "w")
    where.prepare()
    os.chmod(where.token_file, 0o666)
    with pytest.raises(FedtuneError, match="token is writable by other users"):
        where.check_owner()


def test_without_a_worker_the_client_works_in_process_and_says_so_once(
    tmp_path: Path, said: pytest.LogCaptureFixture
) -> None:
    assert node.forward("train", _train_message(), _context()) is None  # no worker configured: silent
    context = _context(worker=str(tmp_path / "none"), **{"worker-wait": 0})
    for _ in range(2):
        assert node.forward("train", _train_message(), context) is None
    lines = [r for r in said.records if "no node worker" in r.getMessage()]
    assert len(lines) == 1 and fallback_said(context)


def test_a_stale_socket_is_said_and_worked_around(tmp_path: Path, said: pytest.LogCaptureFixture) -> None:
    where = node.WorkerDir(tmp_path / "w")
    where.prepare()
    with socket.socket(socket.AF_UNIX) as dead:  # a socket file nobody listens on, as a crash leaves
        dead.bind(str(where.socket))
    context = _context(worker=str(where.path), **{"worker-wait": 0})
    assert node.forward("train", _train_message(), context) is None
    assert any("(stale socket)" in r.getMessage() for r in said.records)


def test_a_restarting_worker_is_waited_for(tmp_path: Path, said: pytest.LogCaptureFixture) -> None:
    # Prepare: no socket yet; a stand-in worker starts listening 0.5 s later and answers once
    where = node.WorkerDir(tmp_path / "w")
    token = where.prepare()

    def late_worker() -> None:
        time.sleep(0.5)
        with Listener(str(where.socket), "AF_UNIX", authkey=token) as listener, listener.accept() as conn:
            conn.recv_bytes()
            conn.send_bytes(b"".join(node._frame(*WorkReply("m1", content=RecordDict()).to_frames())))

    thread = threading.Thread(target=late_worker)
    thread.start()

    # Execute
    context = _context(worker=str(where.path), **{"worker-wait": 10})
    reply = node.forward("train", _train_message(), context)
    thread.join()

    # Assert: the worker's reply, no fallback said
    assert reply is not None and not fallback_said(context)
    assert not [r for r in said.records if "no node worker" in r.getMessage()]


def test_the_wait_ends_in_the_fallback_and_a_bad_wait_is_refused(tmp_path: Path) -> None:
    context = _context(worker=str(tmp_path / "none"), **{"worker-wait": 0.5})
    started = time.monotonic()
    assert node.forward("train", _train_message(), context) is None
    assert time.monotonic() - started >= 0.5 and fallback_said(context)
    context.node_config["worker-wait"] = 30  # said already: the next message does not wait again
    started = time.monotonic()
    assert node.forward("train", _train_message(), context) is None
    assert time.monotonic() - started < 5
    with pytest.raises(FedtuneError, match="node config 'worker-wait': expected seconds >= 0, got -1"):
        node.forward(
            "train", _train_message(), _context(worker=str(tmp_path / "none"), **{"worker-wait": -1})
        )


def test_a_second_worker_on_a_live_folder_is_refused(tmp_path: Path) -> None:
    where = node.WorkerDir(tmp_path / "w")
    where.prepare()
    with socket.socket(socket.AF_UNIX) as live:  # the first worker's socket, listening
        live.bind(str(where.socket))
        live.listen()
        with pytest.raises(FedtuneError, match="another worker already serves"):
            where.prepare()
    assert where.socket.exists()


def test_a_folder_another_user_owns_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    where = node.WorkerDir(tmp_path / "w")
    where.prepare()
    monkeypatch.setattr(node.os, "getuid", lambda: os.stat(where.path).st_uid + 1)
    with pytest.raises(FedtuneError, match=r"w is owned by uid \d+, not this user"):
        node.forward("train", _train_message(), _context(worker=str(where.path)))


# -- a real worker ----------------------------------------------------------------
@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Path]:
    """``fedtune node`` in a process of its own, serving on ``tmp_path/w``."""
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [str(BIN / "fedtune"), "node", "--dir", str(tmp_path / "w"), "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "worker.log").open("wb"),
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.1)
        yield tmp_path / "w"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        assert not (tmp_path / "w" / "worker.sock").exists()  # it cleans up after itself


@pytest.mark.integration
def test_the_worker_replies_exactly_as_the_client_process_would(worker: Path) -> None:
    context = _context(worker=str(worker))
    via_worker = read_reply(client_app.train_handler(_train_message(), context), TrainReply)
    in_process = read_reply(client_app.train_handler(_train_message(), _context()), TrainReply)
    assert not fallback_said(context)
    assert "train message of run 7 worked" in (worker.parent / "worker.log").read_text()
    assert via_worker.train_loss == in_process.train_loss
    ours, theirs = from_record(via_worker.adapter), from_record(in_process.adapter)
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.integration
def test_the_worker_survives_bad_input_and_refuses_a_wrong_token(worker: Path) -> None:
    where = node.WorkerDir(worker)
    with socket.socket(socket.AF_UNIX) as peer:  # connects, then hangs up mid-handshake
        peer.connect(str(where.socket))
    with Client(str(where.socket), "AF_UNIX", authkey=where.token()) as conn:  # a garbage request
        conn.send_bytes(b"\x00\x00\x00\x03abcgarbage")
        assert WorkReply.from_frames(*node._unframe(conn.recv_bytes())).error is not None
    bad = _train_message()
    bad.content["config"]["job"] = "fit"
    with pytest.raises(WorkerError, match="unknown value 'fit'"):
        client_app.train_handler(bad, _context(worker=str(worker)))
    token = where.token()
    where.token_file.write_bytes(b"0" * 64)
    with pytest.raises(FedtuneError, match="token mismatch"):
        client_app.train_handler(_train_message(), _context(worker=str(worker)))
    where.token_file.write_bytes(token)  # the worker went on through all of it
    reply = client_app.train_handler(_train_message(), _context(worker=str(worker)))
    assert read_reply(reply, TrainReply).steps == 2
