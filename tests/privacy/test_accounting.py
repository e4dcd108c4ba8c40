"""privacy.accounting: ε by RDP and PLD, calibration, the ledger's state, adaptive clipping's noise."""

from __future__ import annotations

import json
import math
import re

import pytest
from scipy.stats import norm

from fedtune.errors import FedtuneError
from fedtune.privacy.accounting import (
    MAX_NOISE,
    REL_TOL,
    Ledger,
    adaptive_noise,
    calibrate_noise,
    default_delta,
)


def gaussian_delta(epsilon: float, mu: float) -> float:
    """Exact δ(ε) of the Gaussian mechanism with sensitivity / std = mu (Balle & Wang 2018, Thm. 8)."""
    return float(norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2))


def test_the_issues_values_z1_q01_100_rounds() -> None:
    # Prepare: z = 1, q = 100 / 1000 = 0.1 (Poisson), δ = 1e-5
    ledger = Ledger(1000, 1e-5, sampling="poisson", accountant="rdp")

    # Execute: one event per round
    for _ in range(100):
        ledger.compose(1.0, 100)

    # Assert: issue 14's numbers (we get 7.9039 and 7.0466)
    spent = ledger.epsilons()
    assert ledger.num_releases == 100
    assert spent["rdp"] == pytest.approx(7.90, abs=5e-3)
    assert spent["pld"] == pytest.approx(7.05, abs=5e-3)
    assert ledger.epsilon() == spent["rdp"]


def test_fixed_sampling_counts_the_replace_one_sensitivity_of_2c() -> None:
    # m = N: no amplification. Replacing a client moves the sum by up to 2C, so one round at
    # z = 2 is the Gaussian mechanism with sensitivity / std = 2C / 2C = 1: exact ε = 4.377.
    ledger = Ledger(10, 1e-5, sampling="fixed")
    ledger.compose(2.0, 10)

    spent = ledger.epsilon()

    assert gaussian_delta(spent, mu=1.0) <= 1e-5  # an upper bound on the exact ε ...
    assert spent < 0.5 + math.sqrt(2 * math.log(1e5))  # ... below RDP's classic conversion, 5.30
    assert gaussian_delta(2.17, mu=1.0) > 1e-3  # RDP at z read over C (2.17) would understate it
    assert ledger.epsilons()["pld"] is None


def test_sampling_fewer_clients_spends_less() -> None:
    few, all_ = Ledger(10, 1e-5, sampling="fixed"), Ledger(10, 1e-5, sampling="fixed")
    few.compose(2.0, 1)
    all_.compose(2.0, 10)
    assert 0 < few.epsilon() < all_.epsilon()


def test_an_empty_ledger_has_spent_nothing() -> None:
    assert Ledger(100, 1e-5, sampling="poisson", accountant="pld").epsilons() == {"rdp": 0.0, "pld": 0.0}


@pytest.mark.parametrize(
    ("sampling", "accountant", "population", "target"),
    # z ≈ 0.83, 1.6 and 23: quick to account (m = N: fixed-size RDP in closed form)
    [("poisson", "rdp", 1000, 2.0), ("poisson", "pld", 1000, 0.3), ("fixed", "rdp", 10, 4.0)],
)
def test_calibrated_noise_is_the_smallest_that_meets_the_target(
    sampling: str, accountant: str, population: int, target: float
) -> None:
    m = min(10, population)

    def spent(z: float) -> float:
        ledger = Ledger(population, 1e-5, sampling=sampling, accountant=accountant)
        ledger.compose(z, m, count=100)
        return ledger.epsilon()

    z = calibrate_noise(
        target,
        1e-5,
        population=population,
        sample_size=m,
        rounds=100,
        sampling=sampling,
        accountant=accountant,
    )

    assert spent(z) <= target < spent(z * (1 - REL_TOL))


def test_would_exceed_looks_one_round_ahead_and_changes_nothing() -> None:
    ledger, ahead = Ledger(100, 1e-5, sampling="fixed"), Ledger(100, 1e-5, sampling="fixed")
    ledger.compose(2.0, 10, count=4)
    ahead.compose(2.0, 10, count=5)
    next_epsilon = ahead.epsilon()

    assert ledger.would_exceed(2.0, 10, next_epsilon * (1 - 1e-9))
    assert not ledger.would_exceed(2.0, 10, next_epsilon * (1 + 1e-9))
    assert ledger.num_releases == 4
    assert ledger.epsilon() < next_epsilon


def test_state_round_trip_gives_the_same_epsilon_and_composes_on_identically() -> None:
    # Prepare: a run whose noise changed in round 3 (e.g. client noise with a missing share)
    ledger = Ledger(1000, 1e-5, sampling="poisson", accountant="pld")
    for z in (2.0, 2.0, 1.5, 2.0):
        ledger.compose(z, 10)

    # Execute: save as the checkpoint does (JSON), restore into a fresh ledger
    resumed = Ledger(1000, 1e-5, sampling="poisson", accountant="pld")
    resumed.load_state_dict(json.loads(json.dumps(ledger.state_dict())))

    # Assert
    assert resumed.num_releases == 4
    assert resumed.epsilons() == ledger.epsilons()
    for each in (ledger, resumed):
        each.compose(2.0, 10)
    assert resumed.epsilons() == ledger.epsilons()
    assert resumed.state_dict() == ledger.state_dict()


@pytest.mark.parametrize(
    ("other", "key"),
    [
        (Ledger(999, 1e-5, sampling="poisson"), "partition.num_partitions"),
        (Ledger(1000, 1e-6, sampling="poisson"), "privacy.delta"),
        (Ledger(1000, 1e-5, sampling="fixed"), "privacy.sampling"),
        (Ledger(1000, 1e-5, sampling="poisson", accountant="pld"), "privacy.accountant"),
    ],
)
def test_a_ledger_of_other_settings_is_refused(other: Ledger, key: str) -> None:
    saved = Ledger(1000, 1e-5, sampling="poisson")
    saved.compose(1.0, 10)
    with pytest.raises(FedtuneError, match=re.escape(key)):
        other.load_state_dict(saved.state_dict())
    assert other.num_releases == 0


def test_a_damaged_state_is_refused() -> None:
    state = Ledger(100, 1e-5).state_dict()
    with pytest.raises(FedtuneError, match=r"fed\.fraction_train"):
        Ledger(100, 1e-5).load_state_dict({**state, "events": [[1.0, 101, 3]]})
    with pytest.raises(FedtuneError, match="version"):
        Ledger(100, 1e-5).load_state_dict({**state, "version": 99})


@pytest.mark.parametrize(
    ("call", "key"),
    [
        (lambda: calibrate_noise(0.0, 1e-5, 100, 10, 10), "privacy.target_epsilon"),
        (lambda: calibrate_noise(-1.0, 1e-5, 100, 10, 10), "privacy.target_epsilon"),
        (lambda: calibrate_noise(math.inf, 1e-5, 100, 10, 10), "privacy.target_epsilon"),
        (lambda: calibrate_noise(1.0, 0.0, 100, 10, 10), "privacy.delta"),
        (lambda: calibrate_noise(1.0, 1.0, 100, 10, 10), "privacy.delta"),
        (lambda: calibrate_noise(1.0, 1e-5, 100, 101, 10), "fed.fraction_train"),
        (lambda: calibrate_noise(1.0, 1e-5, 100, 0, 10), "fed.fraction_train"),
        (lambda: calibrate_noise(1.0, 1e-5, 0, 1, 10), "partition.num_partitions"),
        (lambda: calibrate_noise(1.0, 1e-5, 100, 10, 0), "fed.rounds"),
        (lambda: calibrate_noise(1.0, 1e-5, 100, 10, 10, sampling="shuffle"), "privacy.sampling"),
        (lambda: calibrate_noise(1.0, 1e-5, 100, 10, 10, accountant="gdp"), "privacy.accountant"),
        (lambda: Ledger(100, 1e-5, sampling="fixed", accountant="pld"), "privacy.accountant"),
        (lambda: Ledger(100, 1e-5).compose(0.0, 10), "privacy.noise_multiplier"),
        (lambda: Ledger(100, 1e-5).compose(1.0, 10.5), "fed.fraction_train"),
        (lambda: Ledger(100, 1e-5).would_exceed(1.0, 10, 0.0), "privacy.target_epsilon"),
        (lambda: default_delta(1), "partition.num_partitions"),
    ],
)
def test_bad_inputs_name_the_key(call, key: str) -> None:
    with pytest.raises(FedtuneError, match=re.escape(key)):
        call()


def test_an_unreachable_target_is_refused_at_the_noise_cap() -> None:
    # every client every round (m = N), 500 rounds, ε = 0.01 at δ = 1e-5: needs μ = 2√500 / z
    # of about 2e-5, i.e. z near 2e6, far past the cap
    with pytest.raises(FedtuneError, match=r"privacy\.target_epsilon") as raised:
        calibrate_noise(0.01, 1e-5, population=10, sample_size=10, rounds=500)
    assert f"{MAX_NOISE:g}" in str(raised.value)


def test_adaptive_noise_keeps_the_total_cost() -> None:
    # z = 0.6, σ_b = 0.5: (1/0.36 - 1/1)^(-1/2) = (16/9)^(-1/2) = 3/4
    assert adaptive_noise(0.6, 0.5) == pytest.approx(0.75, rel=1e-12)
    # z = 1, σ_b = 1: (1 - 1/4)^(-1/2) = 2/√3
    assert adaptive_noise(1.0, 1.0) == pytest.approx(2 / math.sqrt(3), rel=1e-12)
    # the pair (z_Δ, 2σ_b) composes back to z
    z_delta = adaptive_noise(1.3, 2.0)
    assert (z_delta**-2 + 4.0**-2) ** -0.5 == pytest.approx(1.3, rel=1e-12)


@pytest.mark.parametrize("count_std", [0.5, 0.4])
def test_adaptive_noise_refuses_a_count_that_spends_the_budget(count_std: float) -> None:
    with pytest.raises(FedtuneError, match=r"privacy\.clipped_count_stddev"):
        adaptive_noise(1.0, count_std)


def test_default_delta() -> None:
    assert default_delta(100) == pytest.approx(10**-2.2, rel=1e-12)
    assert default_delta(1000) < 1 / 1000
