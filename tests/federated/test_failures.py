"""Failed clients: the quorum, a round completed on exactly the good replies, retries, failure lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message, MessageType

from federated.fakes import NODE, FakeGrid, error_reply, eval_reply, query_reply, send, strategy, train_reply
from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.federated.failures import phase_outcome, train_quorum
from fedtune.federated.progress import RoundProgress
from fedtune.federated.protocol import RoundMetrics, TrainReply, read_instruction
from fedtune.federated.records import from_record, to_record
from fedtune.federated.server_app import Federation, RoundFailed, run_federation
from fedtune.federated.strategies import check_strategy
from fedtune.rundir import RunDir
from fedtune.split.rounds import RoundHook


@pytest.fixture(autouse=True)
def _task_identity():  # type: ignore[no-untyped-def]
    from federated.fakes import task_identity

    yield from task_identity()


SHAPES = {"m.lora_A.weight": (2, 3), "m.lora_B.weight": (4, 2)}
GLOBAL = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}


def _cfg(tmp_path: Path, *overrides: str, clients: int = 4):
    return load_config(
        "configs/tiny.toml",
        [f"partition.num_partitions={clients}", "model.lora.r=2", f"run.output_dir={tmp_path}", *overrides],
    )


def _filled(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}


def _federation(cfg, grid: FakeGrid) -> Federation:  # type: ignore[no-untyped-def]
    clients = {NODE + i: i for i in range(cfg.partition.num_partitions)}
    run = RunDir.create(cfg)
    return Federation(grid, cfg, run, clients, RoundHook(), RoundProgress(cfg.fed.rounds, enabled=False))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("replies", "fraction", "sampled", "expected"),
    [(1, 0.0, 10, 1), (2, 0.5, 3, 2), (1, 0.5, 5, 3), (1, 0.3, 10, 3), (4, 0.3, 10, 4), (1, 1.0, 7, 7)],
)
def test_the_quorum_is_the_larger_of_the_count_and_the_fraction_of_the_sample(
    tmp_path: Path, replies: int, fraction: float, sampled: int, expected: int
) -> None:
    cfg = _cfg(tmp_path, f"fed.min_train_replies={replies}", f"fed.min_train_fraction={fraction}")
    assert train_quorum(cfg.fed, sampled) == expected  # ceil(0.5 x 5) = 3, ceil(0.3 x 10) = 3


def test_a_round_completes_on_exactly_the_good_replies_one_failing_one_missing(tmp_path: Path) -> None:
    # Prepare: 4 clients; client 1's ClientApp raises, client 3 never answers
    cfg = _cfg(tmp_path, "fed.min_train_replies=2", "fed.round_timeout=0.2")
    states, sizes = (
        {0: _filled(1.0), 1: _filled(50.0), 2: _filled(4.0), 3: _filled(99.0)},
        {0: 1, 1: 5, 2: 2, 3: 9},
    )

    def answer(pid: int, msg: Message) -> Message | None:
        if pid == 1:
            return Message(Error(code=2, reason="ValueError: boom"), reply_to=msg)
        return None if pid == 3 else train_reply(msg, pid, states[pid], sizes[pid])

    fed = _federation(cfg, FakeGrid(answer, nodes=4))

    # Execute
    arrays, trained = fed.train(1, to_record(GLOBAL, "float32"))

    # Assert: FedAvg of clients 0 and 2 only, (1 x 1 + 4 x 2) / (1 + 2) = 3
    got = from_record(arrays)
    for key in SHAPES:
        np.testing.assert_allclose(got[key], np.full(SHAPES[key], 3.0), rtol=1e-6)
    failures = {line["client"]: line for line in fed.strategy.round_log if line.get("event") == "failure"}
    assert set(failures) == {1, 3} and RoundMetrics.from_record(trained).num_clients == 2
    assert failures[1]["node"] == NODE + 1 and failures[1]["phase"] == "train" and failures[1]["round"] == 1
    assert failures[1]["cause"].startswith("error reply 2 (the ClientApp raised an exception): ValueError")
    assert failures[3]["cause"] == "no reply within fed.round_timeout=0.2s"


def test_a_reply_that_fails_the_protocol_is_a_failure() -> None:
    sent = send(strategy("model.lora.r=2", clients=2), 1, GLOBAL)
    good = train_reply(sent[0][1], 0, GLOBAL, 3)
    wrong = eval_reply(sent[1][1], 1)  # an evaluate reply where a train reply was due
    messages = [msg for _, msg in sent.values()]
    outcome = phase_outcome(1, "train", messages, [good, wrong], TrainReply, {NODE: 0, NODE + 1: 1}, "x")
    assert outcome.good == [good]
    ((line,),) = [outcome.failures]
    assert line["client"] == 1 and line["node"] == NODE + 1
    assert line["cause"].startswith("reply fails the protocol")


def test_a_reply_whose_adapter_does_not_decode_is_a_failure_and_not_counted(tmp_path: Path) -> None:
    # Prepare: client 0 replies with an adapter of the wrong shape; the quorum is both replies
    cfg = _cfg(tmp_path, "fed.min_train_replies=2", clients=2)
    bad = {k: np.zeros((1, 1), dtype=np.float32) for k in SHAPES}

    def answer(pid: int, msg: Message) -> Message:
        return train_reply(msg, pid, bad if pid == 0 else _filled(2.0), 1, delta=1)

    fed = _federation(cfg, FakeGrid(answer, nodes=2))

    # Execute / Assert: one failure line naming the fault, and the round is below its quorum
    with pytest.raises(RoundFailed, match="1 good train replies of 2 sampled"):
        fed.train(1, to_record(GLOBAL, "float32"))
    lines = [x for x in fed.run.metrics() if x.get("event")]
    assert [x["client"] for x in lines] == [0]
    assert "client 0: update 'm.lora_A.weight' has shape (1, 1), the adapter sent (2, 3)" in lines[0]["cause"]


def test_below_the_quorum_the_train_phase_is_retried_on_a_fresh_sample(tmp_path: Path) -> None:
    # Prepare: seed 3 samples clients [0, 3] first and [1, 2] on the retry; 0 and 3 fail
    cfg = _cfg(tmp_path, "seed=3", "fed.fraction_train=0.5", "fed.min_train_replies=2", "fed.round_retries=1")
    sizes = {1: 1, 2: 3}

    def answer(pid: int, msg: Message) -> Message:
        if pid in (0, 3):
            return error_reply(msg, "lost its disk")
        return train_reply(msg, pid, _filled(float(pid)), sizes[pid])

    grid = FakeGrid(answer, nodes=4)
    fed = _federation(cfg, grid)

    # Execute
    arrays, _ = fed.train(1, to_record(GLOBAL, "float32"))

    # Assert: both tries were sent; the aggregate is (1 x 1 + 2 x 3) / 4 = 1.75
    assert [m.metadata.dst_node_id - NODE for m in grid.sent] == [0, 3, 1, 2]
    np.testing.assert_allclose(from_record(arrays)["m.lora_A.weight"], np.full((2, 3), 1.75), rtol=1e-6)
    attempts = [(line["client"], line["attempt"]) for line in fed.strategy.round_log if "event" in line]
    assert attempts == [(0, 0), (3, 0)]


def test_below_the_quorum_after_the_retries_the_round_fails_with_its_failure_lines_written(
    tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, "fed.min_train_replies=3", clients=3)

    def answer(pid: int, msg: Message) -> Message:  # only client 0 trains
        return train_reply(msg, pid, GLOBAL, 1) if pid == 0 else error_reply(msg, "out of memory")

    fed = _federation(cfg, FakeGrid(answer, nodes=3))
    with pytest.raises(
        RoundFailed, match=r"1 good train replies of 3 sampled clients, below the quorum of 3"
    ):
        fed.train(1, to_record(GLOBAL, "float32"))
    lines = fed.run.metrics()
    assert [(x["client"], x["event"]) for x in lines] == [(1, "failure"), (2, "failure")]


def _tiny_answer(fail: set[int]):  # type: ignore[no-untyped-def]
    """Clients of the real tiny model: query, train (the global + 0.01) and evaluate replies."""

    def answer(pid: int, msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.QUERY:
            return query_reply(msg, pid)
        if pid in fail:
            return error_reply(msg, "ClientApp stopped responding.")
        if msg.metadata.message_type == MessageType.EVALUATE:
            return eval_reply(msg, pid)
        state = {k: v + 0.01 for k, v in from_record(read_instruction(msg).adapter).items()}
        return train_reply(msg, pid, state, 2)

    return answer


def test_a_failed_run_is_marked_and_a_resume_continues_it(tmp_path: Path) -> None:
    # Prepare: 3 clients, quorum 2, two rounds; in the first run clients 1 and 2 fail
    cfg = load_config(
        "configs/tiny.toml", [f"run.output_dir={tmp_path}", "fed.min_train_replies=2", "run.report=false"]
    )
    run = RunDir.create(cfg)

    # Execute: the first run fails in round 1; the resume has every client back
    with pytest.raises(RoundFailed):
        run_federation(FakeGrid(_tiny_answer({1, 2})), cfg, run, progress=False)  # type: ignore[arg-type]
    state = json.loads((run.path / "state.json").read_text())
    run_federation(FakeGrid(_tiny_answer(set())), cfg, run, progress=False)  # type: ignore[arg-type]

    # Assert: failed after round 0 with the cause; then complete, the failure lines kept
    assert state["last_round"] == 0 and "below the quorum of 2" in state["failed"]
    assert run.last_round() == 2 and run.failed() is None
    assert (run.path / "final" / "adapter_model.safetensors").is_file()
    failed = [(x["round"], x["client"]) for x in run.metrics() if x.get("event") == "failure"]
    assert failed == [(0, 1), (0, 2), (1, 1), (1, 2)]  # round 0's evaluation, round 1's training
    run.mark_failed("disk full while saving final/")  # a failure after the last round ...
    run_federation(FakeGrid(_tiny_answer(set())), cfg, run, progress=False)  # type: ignore[arg-type]
    assert run.failed() is None and run.last_round() == 2  # ... is cleared by the resume


def test_discovery_leaves_out_a_node_whose_client_cannot_start(tmp_path: Path) -> None:
    from fedtune.federated.nodes import discover

    cfg = _cfg(tmp_path, clients=3)

    def answer(pid: int, msg: Message) -> Message:
        if pid == 2:
            return Message(
                Error(code=2, reason="FedtuneError: data-path /missing.jsonl: not found"), reply_to=msg
            )
        return query_reply(msg, pid)

    found = discover(FakeGrid(answer), cfg, poll=0.0)  # type: ignore[arg-type]
    assert found.clients == {NODE: 0, NODE + 1: 1}
    ((line,),) = [found.failures]
    assert line["node"] == NODE + 2 and line["phase"] == "discovery" and "/missing.jsonl" in line["cause"]
    quorum = _cfg(tmp_path, "fed.min_train_replies=3", clients=3)
    with pytest.raises(FedtuneError, match=r"2 of 3 clients started, fewer than the 3 needed"):
        discover(FakeGrid(answer), quorum, poll=0.0)  # type: ignore[arg-type]


def test_waiting_for_missing_nodes_ends_with_the_mismatch_named(tmp_path: Path) -> None:
    from fedtune.federated.nodes import wait_for_nodes

    cfg = _cfg(tmp_path, "fed.wait_timeout=0.05", clients=3)
    with pytest.raises(
        FedtuneError, match=r"2 SuperNode\(s\) connected .* partition.num_partitions=3 are needed"
    ):
        wait_for_nodes(FakeGrid(lambda *_: None, nodes=2), cfg, poll=0.01)  # type: ignore[arg-type]
    fewer = _cfg(tmp_path, "fed.wait_timeout=0.05", "fed.min_available_clients=2", clients=3)
    assert len(wait_for_nodes(FakeGrid(lambda *_: None, nodes=2), fewer, poll=0.01)) == 2  # type: ignore[arg-type]


def test_a_quorum_above_the_sample_and_retries_under_dp_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FedtuneError, match=r"fed.min_train_replies=3 .* samples only 2 clients"):
        check_strategy(_cfg(tmp_path, "fed.fraction_train=0.5", "fed.min_train_replies=3"))
    check_strategy(_cfg(tmp_path, "fed.min_train_fraction=1.0", "fed.min_train_replies=4"))  # all 4, fine
    dp = ["privacy.dp=true", "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.1", "fed.round_retries=1"]
    with pytest.raises(FedtuneError, match=r"fed.round_retries=1: .* set fed.round_retries=0"):
        check_strategy(_cfg(tmp_path, *dp))
