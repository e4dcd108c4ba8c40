"""Server optimisers: hand-worked steps, and bit-for-bit the numbers of Flower's strategies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune.federated.aggregation.server_opt import DEFAULTS, ServerOptimizer


def _one(v: float) -> dict[str, np.ndarray]:
    return {"w": np.array([v], dtype=np.float32)}


def test_avgm_by_hand() -> None:
    opt = ServerOptimizer("avgm", eta=2.0, momentum=0.5)
    # g = x - a = 0 - 1 = -1; m = g; x = 0 - 2 * -1 = 2
    assert opt.step(_one(0.0), _one(1.0), 1)["w"].tolist() == [2.0]
    # g = 2 - 2.5 = -0.5; m = 0.5 * -1 + -0.5 = -1; x = 2 - 2 * -1 = 4
    assert opt.step(_one(2.0), _one(2.5), 2)["w"].tolist() == [4.0]
    assert ServerOptimizer("avgm", eta=1.0).state_dict() == {}  # no momentum, no state


def test_adagrad_by_hand() -> None:
    opt = ServerOptimizer("adagrad", eta=0.1, tau=0.0)
    # d = 2; m = d; v = 4; x = 0 + 0.1 * 2 / 2 = 0.1
    assert opt.step(_one(0.0), _one(2.0), 1)["w"].tolist() == pytest.approx([0.1])
    assert opt.state_dict()["v_t/w"].tolist() == [4.0]


def test_state_dict_round_trip() -> None:
    opt = ServerOptimizer("adam", *DEFAULTS["adam"])
    opt.step(_one(0.0), _one(1.0), 1)
    again = ServerOptimizer("adam", *DEFAULTS["adam"])
    again.load_state_dict(opt.state_dict())
    assert np.array_equal(again.step(_one(0.5), _one(0.7), 2)["w"], opt.step(_one(0.5), _one(0.7), 2)["w"])


@pytest.fixture
def _task_identity():
    from federated.fakes import task_identity

    yield from task_identity()


@pytest.mark.usefixtures("_task_identity")
@pytest.mark.parametrize("kind", ["avgm", "adam", "yogi", "adagrad"])
def test_bit_for_bit_flowers_strategy(kind: str) -> None:
    from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

    one = {"min_available_nodes": 1, "min_train_nodes": 1}  # else Flower waits for a second node
    flower = {
        "avgm": FedAvgM(server_learning_rate=1.5, server_momentum=0.9, **one),
        "adam": FedAdam(**one),
        "yogi": FedYogi(**one),
        "adagrad": FedAdagrad(**one),
    }[kind]
    eta, b1, b2, tau = DEFAULTS[kind]
    ours = ServerOptimizer(kind, eta=1.5 if kind == "avgm" else eta, beta_1=b1, beta_2=b2, tau=tau,
                           momentum=0.9 if kind == "avgm" else 0.0)  # fmt: skip
    rng = np.random.default_rng(1)
    x = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    for server_round in (1, 2, 3):
        mean = {k: (v + rng.normal(size=v.shape) * 0.1).astype(np.float32) for k, v in x.items()}
        sent = list(flower.configure_train(server_round, _numpy_record(x), ConfigRecord(), _Grid()))
        reply = Message(
            RecordDict({"arrays": _numpy_record(mean), "metrics": MetricRecord({"num-examples": 1})}),
            reply_to=_sent_with_id(sent[0]),
        )
        theirs, _ = flower.aggregate_train(server_round, [reply])
        got = ours.step(x, mean, server_round)
        for key in x:
            assert np.array_equal(got[key], theirs[key].numpy().astype(np.float32)), (kind, server_round, key)
        x = got


def _numpy_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    """Flower's own layout, one numpy array per key (fedtune packs its adapters)."""
    return ArrayRecord({k: Array(v) for k, v in state.items()})


class _Grid:
    def get_node_ids(self):
        return [7]


def _sent_with_id(msg: Message) -> Message:
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg
