"""The server <-> client protocol: round trips, and refusals that name the field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedtune.config import load_config
from fedtune.federated import client_app
from fedtune.federated.protocol import (
    PROTOCOL,
    EvaluateReply,
    Instruction,
    Job,
    ProtocolError,
    Query,
    QueryReply,
    RoundMetrics,
    TrainReply,
    instruction_message,
    read_instruction,
)
from fedtune.federated.records import from_record, to_record

CFG = load_config("configs/tiny.toml")
ADAPTER = to_record({"m.lora_A.weight": np.ones((2, 3), np.float32)}, "float32")


@pytest.fixture(autouse=True)
def _task_identity():
    from federated.fakes import task_identity

    yield from task_identity()


def _instruction(**fields) -> Instruction:
    return Instruction(**{"job": Job.PLAIN, "server_round": 2, "config": CFG, "adapter": ADAPTER, **fields})


def test_instruction_round_trip_keeps_every_field() -> None:
    inst = _instruction(
        job=Job.RANKED, rank=4, frozen=ADAPTER, frozen_rank=6, frozen_from=2, proximal_mu=0.5, run_dir="/r"
    )
    back = read_instruction(instruction_message(inst, MessageType.TRAIN, 7))
    assert back.config == CFG  # parsed once, a frozen (hashable) config
    assert {
        f.name: getattr(back, f.name) for f in dataclasses.fields(back) if f.name not in ("adapter", "frozen")
    } == {
        f.name: getattr(inst, f.name) for f in dataclasses.fields(inst) if f.name not in ("adapter", "frozen")
    }
    assert from_record(back.frozen)["m.lora_A.weight"].tolist() == [[1.0] * 3] * 2


def test_wire_keys_are_dashed_defaults_left_out_and_the_adapter_is_flowers_arrays() -> None:
    content = _instruction(trunk_addresses=("a:1",)).to_content()
    assert set(content) == {"config", "arrays"}
    config = content["config"]
    assert set(config) == {"fedtune-protocol", "job", "server-round", "config", "trunk-addresses"}
    assert config["fedtune-protocol"] == PROTOCOL and config["job"] == "plain" and config["server-round"] == 2


def test_replies_round_trip() -> None:
    train = TrainReply(3, 10, ADAPTER, 1.5, 2, 1e-3, 0.25, 1.0, trunk_bytes_up=5.0)
    assert TrainReply.from_content(train.to_content()).trunk_bytes_up == 5.0
    assert TrainReply.from_content(train.to_content()).trunk_bytes_down is None
    ev = EvaluateReply(3, 10, 1.25, 3.49, 40, 0.5, eval_loss_global=1.5)
    assert EvaluateReply.from_content(ev.to_content()) == ev
    assert QueryReply.from_content(QueryReply(1, 2, 3).to_content()) == QueryReply(1, 2, 3)
    assert Query.from_content(Query(CFG).to_content()).config == CFG
    assert RoundMetrics.from_record(RoundMetrics(1.5, 3).to_record()) == RoundMetrics(1.5, 3)


def _message(config: dict) -> Message:
    return Message(
        RecordDict({"config": ConfigRecord(config), "arrays": ADAPTER}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )


@pytest.mark.parametrize(
    ("config", "error"),
    [
        (
            {"server-round": 1, "fedtune-config": "x"},
            "not a fedtune message",
        ),  # an older fedtune / foreign app
        ({"fedtune-protocol": PROTOCOL + 1, "job": "plain"}, "'fedtune-protocol' is 3, this side speaks 2"),
        (
            {"fedtune-protocol": PROTOCOL, "job": "plain", "config": CFG.to_toml()},
            "missing field 'server-round'",
        ),
        (
            {"fedtune-protocol": PROTOCOL, "job": "plain", "server-round": "1", "config": CFG.to_toml()},
            "field 'server-round': expected int, got str",
        ),
        (
            {"fedtune-protocol": PROTOCOL, "job": "sideways", "server-round": 1, "config": CFG.to_toml()},
            "field 'job': unknown value 'sideways'",
        ),
        (
            {
                "fedtune-protocol": PROTOCOL,
                "job": "plain",
                "server-round": 1,
                "config": CFG.to_toml(),
                "x-new": 1,
            },
            "unknown field 'x-new'",
        ),
        (
            {"fedtune-protocol": PROTOCOL, "job": "ranked", "server-round": 1, "config": CFG.to_toml()},
            "job 'ranked' needs field 'rank'",
        ),
        (
            {
                "fedtune-protocol": PROTOCOL,
                "job": "plain",
                "server-round": 1,
                "config": "[fed]\nrounds = 0\n",
            },
            "field 'config': fed.rounds",
        ),
    ],
)
def test_malformed_instructions_are_refused_naming_the_field(config: dict, error: str) -> None:
    with pytest.raises(ProtocolError, match=error.replace("(", r"\(")):
        read_instruction(_message(config))


def test_a_reply_missing_a_field_is_refused_naming_it() -> None:
    content = EvaluateReply(0, 1, 1.0, 2.7, 4, 0.1).to_content()
    del content["metrics"]["eval-loss"]
    with pytest.raises(ProtocolError, match="missing field 'eval-loss'"):
        EvaluateReply.from_content(content, where="reply from node 5")
    foreign = RecordDict({"metrics": MetricRecord({"eval-loss": 1.0})})
    with pytest.raises(ProtocolError, match="reply from node 5: not a fedtune message"):
        EvaluateReply.from_content(foreign, where="reply from node 5")


def test_the_client_refuses_a_foreign_message_before_any_work() -> None:
    """Flower turns the raised error into an error reply; the server logs it, the round goes on."""
    context = Context(1, 1, {"partition-id": 0, "num-partitions": 3}, RecordDict(), {})
    with pytest.raises(ProtocolError, match="no field 'fedtune-protocol'"):
        client_app.train_handler(_message({"server-round": 1}), context)
    with pytest.raises(ProtocolError, match="job 'global' does not train"):
        client_app.train_handler(
            instruction_message(_instruction(job=Job.GLOBAL, rank=2), MessageType.TRAIN, 1), context
        )
