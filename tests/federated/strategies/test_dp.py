"""Client-level DP-FedAvg in the strategy layer, driven by hand (no Flower runtime)."""

from __future__ import annotations

import numpy as np
import pytest

from federated.fakes import send, strategy, train_reply
from fedtune.errors import FedtuneError
from fedtune.federated.protocol import RoundMetrics
from fedtune.federated.records import from_record
from fedtune.federated.strategies import check_strategy
from fedtune.privacy.accounting import Ledger

SHAPES = {"m.lora_A.weight": (2, 3), "m.lora_B.weight": (4, 2)}
GLOBAL = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}
DP = (
    "model.lora.r=2",
    "privacy.dp=true",
    "privacy.sampling='fixed'",
    "privacy.noise_multiplier=0.5",
    "privacy.clip_norm=1.0",
)


def _delta(value: float) -> dict[str, np.ndarray]:
    """An update whose every coordinate is ``value`` (norm: value · √14)."""
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}


def _round(s, states: dict[int, dict], server_round: int = 1, **fields):
    sent = send(s, server_round, GLOBAL)
    replies = [train_reply(msg, pid, states[pid], 10 + pid, **fields) for pid, (_, msg) in sent.items()]
    arrays, metrics = s.aggregate_train(server_round, replies)
    return from_record(arrays), RoundMetrics.from_record(metrics), sent


def test_dp_sends_the_clip_norm_to_the_secretly_sampled_cohort() -> None:
    s = strategy(*DP, "fed.fraction_train=0.5", clients=6)
    sent = send(s, 1, GLOBAL)
    assert len(sent) == 3  # floor(0.5 · 6)
    assert all(inst.clip_norm == 1.0 and inst.noise_std is None for inst, _ in sent.values())
    assert sorted(sent) == s.dp.sample(range(6), 1)  # the secret seed's sample, not the public one
    other = strategy(*DP, "fed.fraction_train=0.5", clients=6)
    other.dp.seed = s.dp.seed + 1
    assert any(sorted(send(other, r, GLOBAL)) != sorted(send(s, r, GLOBAL)) for r in range(1, 6))


def test_the_noised_mean_is_uniform_over_the_cohort_with_the_seeded_noise() -> None:
    s = strategy(*DP, clients=2)
    small = 0.1 / np.sqrt(14)  # norm 0.1: within the clip norm
    got, metrics, _ = _round(s, {0: _delta(small), 1: _delta(2 * small)})
    # uniform weights (not 10 vs 11 examples), divided by the cohort m = 2, plus N(0, (z C)^2) / m
    noise = np.random.default_rng([s.dp.seed, 1, 0])
    for key, shape in SHAPES.items():
        expected = (small + 2 * small + noise.normal(0.0, 0.5, size=shape)) / 2
        np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-7)
    assert metrics.num_clients == 2
    figures = s.round_figures
    assert figures["noise_multiplier"] == 0.5 and figures["clip_norm"] == 1.0
    ledger = Ledger(2, 1 / 2**1.1, sampling="fixed", accountant="rdp")
    ledger.compose(0.5, 2)
    assert figures["epsilon"] == pytest.approx(ledger.epsilon())


def test_an_unclipped_update_is_left_out_but_the_round_is_accounted() -> None:
    s = strategy(*DP, clients=3)
    big = 2.0 / np.sqrt(14)  # norm 2 > C = 1
    _, metrics, _ = _round(s, {0: _delta(0.01), 1: _delta(big), 2: _delta(0.01)})
    assert metrics.num_clients == 2
    rejected = {e["client"]: e["rejected"] for e in s.round_log if "rejected" in e}
    assert list(rejected) == [1] and "unclipped" in rejected[1]
    assert s.dp.ledger.num_releases == 1


def test_checkpoint_and_restore_continue_the_same_epsilon_and_noise() -> None:
    s = strategy(*DP, clients=2)
    _round(s, {0: _delta(0.01), 1: _delta(0.02)}, server_round=1)
    state = s.checkpoint()
    resumed = strategy(*DP, clients=2)
    resumed.restore(state, GLOBAL)
    assert resumed.dp.seed == s.dp.seed and resumed.dp.ledger.num_releases == 1
    a, _, _ = _round(s, {0: _delta(0.01), 1: _delta(0.02)}, server_round=2)
    b, _, _ = _round(resumed, {0: _delta(0.01), 1: _delta(0.02)}, server_round=2)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert s.round_figures["epsilon"] == resumed.round_figures["epsilon"]


def test_client_noise_tells_each_client_its_share() -> None:
    s = strategy(*DP, "privacy.noise='client'", clients=4)
    sent = send(s, 1, GLOBAL)
    assert [inst.noise_std for inst, _ in sent.values()] == [pytest.approx(0.5 * 1.0 / 2)] * 4  # z C / √m


def test_adaptive_clipping_moves_the_clip_norm_from_the_counted_bits() -> None:
    s = strategy(*DP, "privacy.adaptive_clipping=true", "privacy.clipped_count_stddev=5.0", clients=2)
    _round(s, {0: _delta(0.01), 1: _delta(0.01)}, unclipped=1)
    assert s.round_figures["within_share"] == pytest.approx(
        (2 - 1 + np.random.default_rng([s.dp.seed, 1, 2]).normal(0.0, 5.0)) / 2 + 0.5
    )
    assert s.dp.clip_norm != 1.0


def test_ffa_lora_aggregates_b_and_keeps_a() -> None:
    s = strategy(*DP, "model.lora.freeze_a=true", clients=2)
    b_only = {"m.lora_B.weight": np.full((4, 2), 0.01, dtype=np.float32)}
    got, _, _ = _round(s, {0: b_only, 1: b_only})
    np.testing.assert_array_equal(got["m.lora_A.weight"], GLOBAL["m.lora_A.weight"])
    assert not np.allclose(got["m.lora_B.weight"], 0.0)


@pytest.mark.parametrize("strategy_name", ["median", "krum", "trimmed-mean", "scaffold", "stack"])
def test_dp_refuses_a_strategy_that_is_not_a_sum(strategy_name: str) -> None:
    from fedtune.config import load_config

    cfg = load_config("configs/tiny.toml", [*DP, f"fed.strategy='{strategy_name}'"])
    with pytest.raises(FedtuneError, match=r"fed\.strategy"):
        check_strategy(cfg)


def _replies(n: int) -> list:
    from fedtune.federated.protocol import TrainReply
    from fedtune.federated.records import to_record

    return [TrainReply(pid, 10, to_record({}, "float32"), 1.0 + pid, 1, 1e-3, 0.0, 0.1) for pid in range(n)]


def test_a_secure_mean_becomes_the_global_plus_the_mean() -> None:
    s = strategy("model.lora.r=2", clients=2)
    send(s, 1, GLOBAL)
    mean = _delta(0.25)
    arrays, metrics = s.aggregate_mean(1, mean, _replies(2), [1.0, 3.0], {1000: (7, 9)})
    assert [(line["client"], line.get("bytes_up"), line["train_loss"]) for line in s.round_log] == [
        (0, 9, 1.0),
        (1, 0, 2.0),
    ]
    got = from_record(arrays)
    for key in SHAPES:
        np.testing.assert_allclose(got[key], 0.25)
    assert RoundMetrics.from_record(metrics).loss == pytest.approx((1.0 + 3 * 2.0) / 4)


def test_a_secure_mean_under_dp_is_rescaled_to_the_cohort_and_noised() -> None:
    s = strategy(*DP, "fed.fraction_train=1.0", clients=4)
    send(s, 1, GLOBAL)
    arrays, _ = s.aggregate_mean(1, _delta(0.01), _replies(3), [1.0, 1.0, 1.0])  # 3 of m = 4 survived
    noise = np.random.default_rng([s.dp.seed, 1, 0])
    got = from_record(arrays)
    for key, shape in SHAPES.items():
        np.testing.assert_allclose(got[key], (3 * 0.01 + noise.normal(0.0, 0.5, size=shape)) / 4, rtol=1e-5)
    assert s.dp.ledger.num_releases == 1


def test_poisson_sampling_is_the_default_and_varies_the_cohort() -> None:
    s = strategy(
        "model.lora.r=2",
        "privacy.dp=true",
        "privacy.noise_multiplier=1.0",
        "fed.fraction_train=0.5",
        clients=8,
    )
    assert s.cfg.privacy.sampling == "poisson" and s.dp.plan.cohort == 4
    sizes = {len(send(s, r, GLOBAL)) for r in range(1, 30)}
    assert len(sizes) > 1 and min(sizes) < 4 < max(sizes)


def test_a_secagg_range_that_would_cut_the_noise_shares_is_refused() -> None:
    from fedtune.config import load_config
    from fedtune.privacy.plan import dp_plan

    over = (*DP, "privacy.secagg.enabled=true", "privacy.noise='client'", "privacy.clip_norm=0.5")
    dp_plan(load_config("configs/tiny.toml", [*over, "privacy.secagg.clipping_range=2.0"]))
    with pytest.raises(FedtuneError, match=r"privacy\.secagg\.clipping_range"):
        dp_plan(load_config("configs/tiny.toml", [*over, "privacy.secagg.clipping_range=0.6"]))


def test_an_update_clipped_against_the_fp16_start_it_received_is_not_rejected() -> None:
    s = strategy(*DP, "privacy.clip_norm=0.01", clients=2)  # fed.wire_dtype float16 by default
    start = {k: np.full(shape, 0.1, dtype=np.float32) for k, shape in SHAPES.items()}  # not exact in fp16
    sent = send(s, 1, start)
    replies = []
    for pid, (inst, msg) in sent.items():
        received = from_record(inst.adapter)
        assert not np.array_equal(received["m.lora_B.weight"], start["m.lora_B.weight"])
        step = -0.01 / np.sqrt(14)  # norm exactly C against what it received; away from the fp32 start
        replies.append(train_reply(msg, pid, {k: v + step for k, v in received.items()}, 10))
    _, metrics = s.aggregate_train(1, replies)
    assert RoundMetrics.from_record(metrics).num_clients == 2
    assert not any("rejected" in line for line in s.round_log)
