"""Strategy-level checks: bad updates and malformed replies are left out, the round goes on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from federated.fakes import eval_reply, send, strategy, train_reply
from fedtune.federated.aggregation.fedavg import fedavg
from fedtune.federated.protocol import Job, RoundMetrics
from fedtune.federated.records import from_record, to_record
from fedtune.federated.strategies import STRATEGIES

SHAPES = {"m.lora_A.weight": (2, 3), "m.lora_B.weight": (4, 2)}
GLOBAL = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}


def _state(rng: np.random.Generator, scale: float = 0.01) -> dict[str, np.ndarray]:
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def _strategy(*overrides: str, clients: int = 7):
    return strategy("model.lora.r=2", *overrides, clients=clients)  # rank 2, as SHAPES


def _aggregate(s, states, sizes, server_round: int = 1):
    sent = send(s, server_round, GLOBAL)
    replies = [train_reply(msg, pid, states[pid], sizes[pid]) for pid, (_, msg) in sent.items()]
    return s.aggregate_train(server_round, replies)


def test_every_client_gets_the_global_adapter_as_a_plain_instruction() -> None:
    s = _strategy(clients=2)
    sent = send(s, 3, GLOBAL)
    for inst, _ in sent.values():
        assert inst.job is Job.PLAIN and inst.server_round == 3 and inst.config == s.cfg
        assert from_record(inst.adapter).keys() == GLOBAL.keys()
        assert inst.proximal_mu == 0.0 and inst.correction is None


def test_nan_wrong_shape_and_huge_updates_are_left_out() -> None:
    rng = np.random.default_rng(0)
    good = [_state(rng) for _ in range(4)]
    nan = _state(rng)
    nan["m.lora_A.weight"][0, 0] = np.nan
    wrong = {**_state(rng), "m.lora_B.weight": np.zeros((5, 2), dtype=np.float32)}
    huge = {k: v * 1e4 for k, v in _state(rng).items()}
    s = _strategy("fed.outlier_norm_factor=10.0")
    states = [good[0], nan, good[1], wrong, good[2], huge, good[3]]
    arrays, metrics = _aggregate(s, states, [10, 20, 30, 40, 50, 60, 70])
    expected = fedavg(good, [10, 30, 50, 70])
    got = from_record(arrays)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6)
    assert RoundMetrics.from_record(metrics).num_clients == 4
    rejected = {e["client"]: e["rejected"] for e in s.round_log if "rejected" in e}
    assert set(rejected) == {1, 3, 5}
    assert "NaN" in rejected[1] or "finite" in rejected[1]
    assert "shape" in rejected[3] and "huge-norm" in rejected[5]


def test_a_malformed_or_foreign_reply_is_left_out_with_the_field_named(caplog) -> None:
    rng = np.random.default_rng(4)
    states = [_state(rng) for _ in range(3)]
    s = _strategy(clients=3)
    sent = send(s, 1, GLOBAL)
    good = train_reply(sent[0][1], 0, states[0], 10)
    # client 1 runs an older app: no protocol version, its own metric names
    foreign = Message(
        RecordDict({"arrays": to_record(states[1], "float32"), "metrics": MetricRecord({"num-examples": 5})}),
        reply_to=sent[1][1],
    )
    # client 2 sends a mistyped field
    bad = train_reply(sent[2][1], 2, states[2], 10)
    bad.content["metrics"]["steps"] = 1.5
    arrays, metrics = s.aggregate_train(1, [good, foreign, bad])
    np.testing.assert_array_equal(from_record(arrays)["m.lora_A.weight"], states[0]["m.lora_A.weight"])
    assert RoundMetrics.from_record(metrics).num_clients == 1
    assert "fedtune-protocol" in caplog.text and "'steps'" in caplog.text


def test_clip_norm_bounds_each_update() -> None:
    rng = np.random.default_rng(1)
    states = [_state(rng, scale=1.0) for _ in range(2)]
    arrays, _ = _aggregate(_strategy("fed.clip_norm=0.5", clients=2), states, [1, 1])
    norm = np.sqrt(sum(float((v**2).sum()) for v in from_record(arrays).values()))
    assert norm <= 0.5 + 1e-6  # the mean of two vectors of norm 0.5 has norm <= 0.5


@pytest.mark.parametrize("name", [n for n in STRATEGIES.names() if n not in ("stack", "zero-pad")])
def test_every_strategy_aggregates_good_updates(name: str) -> None:
    rng = np.random.default_rng(2)
    states = [_state(rng) for _ in range(5)]
    arrays, _ = _aggregate(_strategy(f"fed.strategy='{name}'", clients=5), states, [1, 2, 3, 4, 5])
    got = from_record(arrays)
    assert got.keys() == GLOBAL.keys() and all(np.isfinite(v).all() for v in got.values())


def test_evaluation_lines_and_weighted_loss() -> None:
    s = _strategy(clients=2)
    sent = send(s, 2, GLOBAL, train=False)
    replies = [eval_reply(msg, pid, loss=[1.0, 4.0][pid], n=[1, 3][pid]) for pid, (_, msg) in sent.items()]
    metrics = RoundMetrics.from_record(s.aggregate_evaluate(2, replies))
    assert metrics.loss == (1.0 * 1 + 4.0 * 3) / 4 and metrics.num_clients == 2
    assert [(e["client"], e["eval_loss"], e["phase"]) for e in s.round_log] == [
        (0, 1.0, "evaluate"),
        (1, 4.0, "evaluate"),
    ]
    assert all(e["bytes_down"] > 0 and e["bytes_up"] > 0 for e in s.round_log)


def test_fedprox_sends_mu_to_training_only() -> None:
    s = _strategy("fed.strategy='fedprox'", "fed.proximal_mu=0.25", clients=1)
    assert send(s, 1, GLOBAL)[0][0].proximal_mu == 0.25
    assert send(s, 1, GLOBAL, train=False)[0][0].proximal_mu == 0.0


def test_fedadam_state_round_trips() -> None:
    rng = np.random.default_rng(3)
    s = _strategy("fed.strategy='fedadam'", clients=2)
    _aggregate(s, [_state(rng), _state(rng)], [1, 1])
    state = s.server_state()
    assert {k.split("/")[0] for k in state} == {"m_t", "v_t"}
    fresh = _strategy("fed.strategy='fedadam'", clients=2)
    fresh.load_server_state(state, GLOBAL)
    assert fresh.server_state().keys() == state.keys()
    assert all(np.array_equal(fresh.server_state()[k], v) for k, v in state.items())


def test_fedavgm_pairs_arrays_by_name_when_clients_list_keys_in_another_order() -> None:
    # The global comes off disk in safetensors' (sorted) order, replies in the model's order:
    # the aggregate keeps the global's order and pairs by name.
    s = _strategy("fed.strategy='fedavgm'", "fed.server_lr=2.0", clients=2)
    a = {k: np.full(sh, 1.0, dtype=np.float32) for k, sh in reversed(SHAPES.items())}
    b = {k: np.full(sh, 3.0, dtype=np.float32) for k, sh in reversed(SHAPES.items())}
    got = from_record(_aggregate(s, [a, b], [1, 1])[0])
    assert list(got) == list(GLOBAL)
    for key, shape in SHAPES.items():  # global 0, mean update 2.0, server lr 2, no momentum: 4.0
        np.testing.assert_allclose(got[key], np.full(shape, 4.0))


def test_instruction_fields_from_the_round_loop_reach_every_client() -> None:
    s = _strategy("split.enabled=true", clients=2)
    s.instruction_fields = {"trunk_addresses": ("127.0.0.1:1", "127.0.0.1:2")}
    for inst, _ in send(s, 1, GLOBAL).values():
        assert inst.job is Job.SPLIT and inst.trunk_addresses == ("127.0.0.1:1", "127.0.0.1:2")
        assert dataclasses.replace(inst).check() == inst
