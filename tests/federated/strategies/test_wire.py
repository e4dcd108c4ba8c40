"""int8 / nf4 on the wire in the strategy layer: Q(global) down, delta-coded replies up, the checks."""

from __future__ import annotations

import numpy as np
import pytest

from federated.fakes import send, strategy
from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.federated.protocol import RoundMetrics, TrainReply, reply_message
from fedtune.federated.protocol.tensors import unpack
from fedtune.federated.quantize import max_error
from fedtune.federated.records import from_record, to_record
from fedtune.federated.strategies import check_strategy

# a global whose values are not all a block's absmax, so Q(global) != global
GLOBAL = {
    "m.lora_A.weight": np.array([[0.5, -0.3, 0.11], [0.07, 0.9, -0.2]], np.float32),
    "m.lora_B.weight": np.linspace(-0.01, 0.02, 8, dtype=np.float32).reshape(4, 2),
}


def _reply(msg, pid: int, update: dict[str, np.ndarray], n: int, fmt: str):
    reply = TrainReply(pid, n, to_record(update, fmt, 64), 1.0, 1, 1e-3, 0.0, 0.1, delta=1)
    return reply_message(reply, msg)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_the_global_goes_down_quantised_and_the_server_keeps_float32(fmt: str) -> None:
    # Prepare
    s = strategy("model.lora.r=2", f"fed.wire_dtype='{fmt}'", clients=2)

    # Execute
    sent = send(s, 1, GLOBAL)

    # Assert: quantised tensors; the clients decode Q(global), the server keeps global
    for inst, _ in sent.values():
        assert unpack(inst.adapter)[0] == f"{fmt}.b64"
        received = from_record(inst.adapter)
        assert not np.array_equal(received["m.lora_A.weight"], GLOBAL["m.lora_A.weight"])
        for k, v in GLOBAL.items():
            assert (np.abs(received[k] - v) <= max_error(v, fmt, 64).reshape(v.shape)).all()
    for pid in (0, 1):
        for k, v in GLOBAL.items():
            np.testing.assert_array_equal(s._references[pid][k], v)


def test_fedavg_of_delta_replies_by_hand() -> None:
    # Prepare: updates of one magnitude per tensor decode exactly (every value is its block's absmax)
    s = strategy("model.lora.r=2", "fed.wire_dtype='int8'", clients=2)
    sent = send(s, 1, GLOBAL)
    d0 = {
        "m.lora_A.weight": np.full((2, 3), 0.01, np.float32),
        "m.lora_B.weight": np.full((4, 2), 0.02, np.float32),
    }
    d1 = {
        "m.lora_A.weight": np.full((2, 3), -0.03, np.float32),
        "m.lora_B.weight": np.full((4, 2), 0.04, np.float32),
    }
    replies = [_reply(sent[0][1], 0, d0, 1, "int8"), _reply(sent[1][1], 1, d1, 3, "int8")]

    # Execute
    arrays, metrics = s.aggregate_train(1, replies)

    # Assert: global + (1 d0 + 3 d1) / 4 = global + (-0.02 in A, +0.035 in B), against the
    # server's own float32 global (not the rounded one the clients started from)
    got = from_record(arrays)
    np.testing.assert_allclose(got["m.lora_A.weight"], GLOBAL["m.lora_A.weight"] - 0.02, atol=1e-7)
    np.testing.assert_allclose(got["m.lora_B.weight"], GLOBAL["m.lora_B.weight"] + 0.035, atol=1e-7)
    assert RoundMetrics.from_record(metrics).num_clients == 2


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_fedavg_of_random_delta_replies_is_within_the_bound(fmt: str) -> None:
    # Prepare: three clients' small random updates, weights 1, 2, 5
    s = strategy("model.lora.r=2", f"fed.wire_dtype='{fmt}'", clients=3)
    sent = send(s, 2, GLOBAL)
    rng = np.random.default_rng(0)
    deltas = [
        {k: (rng.normal(size=v.shape) * 1e-4).astype(np.float32) for k, v in GLOBAL.items()} for _ in range(3)
    ]
    weights = [1, 2, 5]
    replies = [_reply(sent[p][1], p, deltas[p], weights[p], fmt) for p in range(3)]

    # Execute
    got = from_record(s.aggregate_train(2, replies)[0])

    # Assert: |got - (global + Σ w d / Σ w)| <= Σ w bound(d) / Σ w, per value
    for k, g in GLOBAL.items():
        exact = g + sum(w * d[k] for w, d in zip(weights, deltas, strict=True)) / 8
        bound = (
            sum(w * max_error(d[k], fmt, 64).reshape(g.shape) for w, d in zip(weights, deltas, strict=True))
            / 8
        )
        assert (np.abs(got[k] - exact) <= bound + 1e-7).all()
        assert np.abs(got[k] - g).max() > 1e-5  # the updates were not rounded away


def test_a_delta_reply_that_does_not_fit_is_left_out() -> None:
    # Prepare: client 1's update lacks a key
    s = strategy("model.lora.r=2", "fed.wire_dtype='int8'", clients=2)
    sent = send(s, 1, GLOBAL)
    d = {k: np.full(v.shape, 0.01, np.float32) for k, v in GLOBAL.items()}
    replies = [
        _reply(sent[0][1], 0, d, 1, "int8"),
        _reply(sent[1][1], 1, {"m.lora_A.weight": d["m.lora_A.weight"]}, 1, "int8"),
    ]

    # Execute
    arrays, metrics = s.aggregate_train(1, replies)

    # Assert: the round goes on with client 0 alone
    assert RoundMetrics.from_record(metrics).num_clients == 1
    np.testing.assert_allclose(
        from_record(arrays)["m.lora_B.weight"], GLOBAL["m.lora_B.weight"] + 0.01, atol=1e-7
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["fed.error_feedback=true"],
            r"fed\.error_feedback: needs fed\.wire_dtype 'int8' or 'nf4', not 'float16'",
        ),
        (
            [
                "fed.wire_dtype='nf4'",
                "fed.error_feedback=true",
                "privacy.dp=true",
                "privacy.noise_multiplier=0.5",
            ],
            r"fed\.error_feedback: not with privacy\.dp",
        ),
        (
            [
                "fed.wire_dtype='int8'",
                "fed.error_feedback=true",
                "fed.strategy='stack'",
                "model.lora.ranks=[2, 4, 4]",
            ],
            r"fed\.error_feedback: not with fed\.strategy 'stack'",
        ),
    ],
)
def test_error_feedback_is_refused_where_nothing_can_be_fed_back(overrides: list[str], message: str) -> None:
    with pytest.raises(FedtuneError, match=message):
        check_strategy(load_config("configs/tiny.toml", overrides))


def test_supported_combinations_pass_and_an_unknown_format_names_the_key() -> None:
    for overrides in (
        [
            "fed.wire_dtype='nf4'",
            "fed.error_feedback=true",
            "fed.strategy='zero-pad'",
            "model.lora.ranks=[2, 4, 4]",
        ],
        ["fed.wire_dtype='int8'", "fed.strategy='stack'", "model.lora.ranks=[2, 4, 4]"],
        ["fed.wire_dtype='int8'", "privacy.dp=true", "privacy.noise_multiplier=0.5"],
        ["fed.wire_dtype='nf4'", "fed.error_feedback=true", "split.enabled=true"],
    ):
        check_strategy(load_config("configs/tiny.toml", overrides))
    with pytest.raises(FedtuneError, match=r"fed\.wire_dtype"):
        load_config("configs/tiny.toml", ["fed.wire_dtype='int4'"])
