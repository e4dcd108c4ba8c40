"""DP-FedAvg maths on hand-worked numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune.privacy.dpfedavg import (
    adaptive_clip,
    clip_delta,
    cohort_size,
    dp_sample,
    global_norm,
    noised_mean,
    privatise,
)


def test_global_norm_spans_every_tensor() -> None:
    assert global_norm({"a": np.array([3.0]), "b": np.array([[4.0]])}) == 5.0


def test_clip_delta_scales_down_and_reports_the_bit() -> None:
    delta = {"a": np.array([3.0, 0.0]), "b": np.array([4.0])}  # norm 5
    clipped, within = clip_delta(delta, 1.0)
    assert not within
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [0.8], rtol=1e-6)
    same, within = clip_delta(delta, 5.0)
    assert within
    np.testing.assert_allclose(same["a"], delta["a"])
    with pytest.raises(ValueError):
        clip_delta(delta, 0.0)


def test_noised_mean_divides_by_the_expected_cohort_not_the_replies() -> None:
    template = {"w": np.zeros(2)}
    deltas = [{"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, 0.0])}]
    mean, noise_norm, signal_norm = noised_mean(deltas, template, expected_size=4, noise_std=0.0, rng=None)
    np.testing.assert_allclose(mean["w"], [1.0, 0.5])  # (4, 2) / 4
    assert noise_norm == 0.0
    assert signal_norm == pytest.approx(np.sqrt(1.0**2 + 0.5**2))


def test_noised_mean_adds_the_noise_of_its_generator() -> None:
    template = {"w": np.zeros(3)}
    mean, noise_norm, signal_norm = noised_mean(
        [], template, expected_size=2, noise_std=0.5, rng=np.random.default_rng(7)
    )
    assert signal_norm == 0.0
    noise = np.random.default_rng(7).normal(0.0, 0.5, size=3)
    np.testing.assert_allclose(mean["w"], noise / 2, rtol=1e-6)
    assert noise_norm == pytest.approx(np.linalg.norm(noise) / 2)


def test_adaptive_clip_moves_towards_the_quantile() -> None:
    # all 4 of 4 within, no count noise: b = 1, C · exp(-0.2 · (1 - 0.5)) = C · e^-0.1
    rng = np.random.default_rng(0)
    new, share = adaptive_clip(
        2.0, 4, 4, expected_size=4, count_std=1e-12, target_quantile=0.5, clip_lr=0.2, rng=rng
    )
    assert share == pytest.approx(1.0)
    assert new == pytest.approx(2.0 * math.exp(-0.1))
    grown, _ = adaptive_clip(
        2.0, 0, 4, expected_size=4, count_std=1e-12, target_quantile=0.5, clip_lr=0.2, rng=rng
    )
    assert grown == pytest.approx(2.0 * math.exp(0.1))


def test_adaptive_clip_centres_the_bits_on_the_expected_cohort() -> None:
    # 3 of 2 expected replied (Poisson), all within: (3 - 3/2) / 2 + 1/2 = 1.25
    _, share = adaptive_clip(
        1.0,
        3,
        3,
        expected_size=2,
        count_std=1e-12,
        target_quantile=0.5,
        clip_lr=0.2,
        rng=np.random.default_rng(0),
    )
    assert share == pytest.approx(1.25)


def test_cohort_size_follows_fraction_and_minimum() -> None:
    assert cohort_size(100, 0.1, 1) == 10
    assert cohort_size(100, 0.01, 5) == 5
    assert cohort_size(3, 1.0, 5) == 3


def test_fixed_sampling_draws_the_cohort_and_is_reproducible() -> None:
    a = dp_sample(range(100), 10, "fixed", np.random.default_rng([1, 2]))
    assert len(a) == 10 and a == sorted(a) and len(set(a)) == 10
    assert a == dp_sample(range(100), 10, "fixed", np.random.default_rng([1, 2]))
    assert a != dp_sample(range(100), 10, "fixed", np.random.default_rng([1, 3]))


def test_poisson_sampling_takes_each_client_with_probability_q() -> None:
    sizes = [len(dp_sample(range(200), 20, "poisson", np.random.default_rng([0, r]))) for r in range(200)]
    assert 19 < np.mean(sizes) < 21  # E = 20, sd of the mean ≈ 0.3
    assert len(set(sizes)) > 5  # the size varies, unlike fixed-size sampling
    with pytest.raises(ValueError):
        dp_sample(range(3), 1, "other", np.random.default_rng(0))


def test_privatise_sends_the_start_plus_the_clipped_update() -> None:
    start = {"a": np.array([1.0, 1.0], dtype=np.float32)}
    trained = {"a": np.array([4.0, 5.0], dtype=np.float32)}  # delta (3, 4), norm 5
    sent, within = privatise(trained, start, 1.0, None, None)
    assert not within
    np.testing.assert_allclose(sent["a"], [1.6, 1.8], rtol=1e-6)
    assert sent["a"].dtype == np.float32


def test_privatise_adds_a_noise_share_and_keeps_only_the_sent_keys() -> None:
    start = {"a": np.zeros(4, dtype=np.float32), "lora_A": np.ones(2, dtype=np.float32)}
    trained = {"a": np.zeros(4, dtype=np.float32)}  # FFA-LoRA: A is not sent
    sent, within = privatise(trained, start, 1.0, 0.1, np.random.default_rng(3))
    assert within and set(sent) == {"a"}
    np.testing.assert_allclose(sent["a"], np.random.default_rng(3).normal(0, 0.1, 4), rtol=1e-5)
    with pytest.raises(ValueError):
        privatise(trained, start, 1.0, 0.1, None)
