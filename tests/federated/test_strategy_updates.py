"""Strategy-level checks: bad updates are rejected and logged, the round goes on."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedtune.config import load_config
from fedtune.federated.aggregate import fedavg
from fedtune.federated.records import from_record, to_record
from fedtune.federated.strategies import STRATEGIES, build_strategy

SHAPES = {"m.lora_A.weight": (2, 3), "m.lora_B.weight": (4, 2)}


def _state(rng: np.random.Generator, scale: float = 0.01) -> dict[str, np.ndarray]:
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def _strategy(*overrides: str, clients: int = 7):
    cfg = load_config(
        "configs/tiny.toml", [f"partition.num_partitions={clients}", "model.lora.r=2", *overrides]
    )  # rank 2, as SHAPES
    return build_strategy(cfg, {1000 + i: i for i in range(clients)})


def _replies(strategy, states: list[dict[str, np.ndarray]], sizes: list[int]) -> list[Message]:
    sent = list(strategy.configure_train(1, to_record(GLOBAL, "float32"), ConfigRecord(), grid=None))
    replies = []
    for msg, state, n in zip(sent, states, sizes, strict=True):
        pid = msg.metadata.dst_node_id - 1000
        metrics = MetricRecord({"num-examples": n, "train-loss": 1.0, "partition-id": pid, "seconds": 0.1})
        content = RecordDict({"arrays": to_record(state, "float32"), "metrics": metrics})
        msg.metadata.__dict__["_message_id"] = f"m{pid}"  # as the runtime assigns on sending
        replies.append(Message(content, reply_to=msg))
    return replies


GLOBAL = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages are built outside a Flower runtime here: give them the identity one would."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = None, None, None


def test_nan_wrong_shape_and_huge_updates_are_left_out() -> None:
    rng = np.random.default_rng(0)
    good = [_state(rng) for _ in range(4)]
    nan = _state(rng)
    nan["m.lora_A.weight"][0, 0] = np.nan
    wrong = {**_state(rng), "m.lora_B.weight": np.zeros((5, 2), dtype=np.float32)}
    huge = {k: v * 1e4 for k, v in _state(rng).items()}
    strategy = _strategy("fed.outlier_norm_factor=10.0")
    states = [good[0], nan, good[1], wrong, good[2], huge, good[3]]
    sizes = [10, 20, 30, 40, 50, 60, 70]
    arrays, metrics = strategy.aggregate_train(1, _replies(strategy, states, sizes))
    expected = fedavg(good, [10, 30, 50, 70])
    got = from_record(arrays)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6)
    assert metrics["num-clients"] == 4
    rejected = {e["client"]: e["rejected"] for e in strategy.round_log if "rejected" in e}
    assert set(rejected) == {1, 3, 5}
    assert "NaN" in rejected[1] or "finite" in rejected[1]
    assert "shape" in rejected[3] and "huge-norm" in rejected[5]


def test_clip_norm_bounds_each_update() -> None:
    rng = np.random.default_rng(1)
    states = [_state(rng, scale=1.0) for _ in range(2)]
    strategy = _strategy("fed.clip_norm=0.5", clients=2)
    arrays, _ = strategy.aggregate_train(1, _replies(strategy, states, [1, 1]))
    norm = np.sqrt(sum(float((v**2).sum()) for v in from_record(arrays).values()))
    assert norm <= 0.5 + 1e-6  # the mean of two vectors of norm 0.5 has norm <= 0.5


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_aggregates_good_updates(name: str) -> None:
    rng = np.random.default_rng(2)
    states = [_state(rng) for _ in range(5)]
    strategy = _strategy(f"fed.strategy='{name}'", clients=5)
    arrays, _ = strategy.aggregate_train(1, _replies(strategy, states, [1, 2, 3, 4, 5]))
    got = from_record(arrays)
    assert got.keys() == GLOBAL.keys() and all(np.isfinite(v).all() for v in got.values())


def test_median_is_the_coordinate_median() -> None:
    states = [{k: np.full(s, v, dtype=np.float32) for k, s in SHAPES.items()} for v in (1.0, 2.0, 10.0)]
    strategy = _strategy("fed.strategy='median'", clients=3)
    got = from_record(strategy.aggregate_train(1, _replies(strategy, states, [1, 1, 1]))[0])
    assert all(np.allclose(v, 2.0) for v in got.values())


def test_fedadam_state_round_trips() -> None:
    rng = np.random.default_rng(3)
    strategy = _strategy("fed.strategy='fedadam'", clients=2)
    strategy.aggregate_train(1, _replies(strategy, [_state(rng), _state(rng)], [1, 1]))
    state = strategy.server_state()
    assert {k.split("/")[0] for k in state} == {"m_t", "v_t"}
    fresh = _strategy("fed.strategy='fedadam'", clients=2)
    fresh.load_server_state(state, GLOBAL)
    assert all(np.array_equal(fresh.m_t[k], strategy.m_t[k]) for k in strategy.m_t)


def test_fedavgm_pairs_arrays_by_name_when_clients_list_keys_in_another_order() -> None:
    # The global comes off disk in safetensors' (sorted) order, replies in the model's order:
    # Flower's FedAvgM pairs arrays by position, so the aggregate must keep the global's order.
    strategy = _strategy("fed.strategy='fedavgm'", "fed.server_lr=2.0", clients=2)
    a = {k: np.full(s, 1.0, dtype=np.float32) for k, s in reversed(SHAPES.items())}
    b = {k: np.full(s, 3.0, dtype=np.float32) for k, s in reversed(SHAPES.items())}
    got = from_record(strategy.aggregate_train(1, _replies(strategy, [a, b], [1, 1]))[0])
    assert list(got) == list(GLOBAL)
    for key, shape in SHAPES.items():  # global 0, mean update 2.0, server lr 2, no momentum: 4.0
        np.testing.assert_allclose(got[key], np.full(shape, 4.0))
