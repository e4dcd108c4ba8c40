"""ε accounting of client-level DP-FedAvg: one sampled Gaussian release per round.

The noise multiplier ``z`` is fedtune's throughout (``privacy.noise_multiplier``): the std of
the noise on the *sum* of the clipped updates over the clip norm ``C``. What one client can
change in that sum depends on the neighbouring relation, which the sampling fixes:

- ``"poisson"``: each of the ``N`` clients takes part with probability ``q = m / N``; a
  neighbouring population adds or removes one client, so the sum moves by at most ``C``.
  Flower's ``SamplingMethod.POISSON`` with ``NeighboringRelation.ADD_OR_REMOVE_ONE``; the
  event carries ``z``.
- ``"fixed"``: ``m`` of the ``N`` clients without replacement; ``N`` is public, so a
  neighbouring population replaces one client and the sum moves by up to ``2C``. Flower's
  ``SamplingMethod.WITHOUT_REPLACEMENT`` with ``NeighboringRelation.REPLACE_ONE``. Its RDP
  (dp-accounting's ``_compute_rdp_sample_wor_gaussian``, Wang, Balle & Kasiviswanathan 2019,
  Thm. 27) reads the noise multiplier as the std over the *replace-one* sensitivity: at
  ``m = N`` it is the plain Gaussian's ``α / 2z²``. So the event carries ``z / 2``.
  (dp-accounting's PLD reads a REPLACE_ONE Gaussian the other way, as shifts ``±C``: for the
  same ``GaussianDpEvent(2)`` its PLD says ε = 4.38 and its RDP 2.17 at δ = 1e-5.)

RDP is Flower's ``RdpAccountant`` (over dp-accounting). PLD is dp-accounting's
``PLDAccountant`` with ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``. dp-accounting 0.6's
PLD has no sampling without replacement: it answers ``SampledWithoutReplacementDpEvent`` with
``UnsupportedEventError``. Poisson accounting is no stand-in for fixed-size batches: the two can
differ by an order of magnitude in ε (Lebeda, Regehr, Kamath & Steinke 2024, "Avoiding pitfalls
for privacy accounting of subsampled mechanisms under composition", arXiv:2405.20769, which
also gives the dominating pair a PLD for it would need). With ``"fixed"`` sampling the PLD ε is
therefore ``None`` and ``accountant = "pld"`` is refused.

Composition commutes, so ε is a function of how many times each distinct ``(z, m)`` was
released: :class:`Ledger` keeps those counts and computes every ε afresh from them (a resumed
ledger gives the very same ε). It does not keep one long-lived ``RdpAccountant``: that one's
``would_exceed`` and ``load_state_dict`` replay every composition one by one, at 0.1-0.2 s each
(measured on 2 cores), which is 10-20 s per round by round 100.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation as DpNeighboringRelation
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, RdpAccountant, SamplingMethod
from flwr.serverapp import PrivacyConfig as FlowerPrivacyConfig

from fedtune.errors import FedtuneError
from fedtune.privacy.quiet import quiet_absl

ACCOUNTANTS = ("rdp", "pld")
# sampling -> (Flower's sampling method, neighbouring relation, the update sum's sensitivity in C)
SAMPLINGS: dict[str, tuple[SamplingMethod, NeighboringRelation, float]] = {
    "fixed": (SamplingMethod.WITHOUT_REPLACEMENT, NeighboringRelation.REPLACE_ONE, 2.0),
    "poisson": (SamplingMethod.POISSON, NeighboringRelation.ADD_OR_REMOVE_ONE, 1.0),
}
# z beyond 1e3: noise of 1000 clip norms on the sum, i.e. 1000 C / m on each coordinate of a
# mean whose norm is at most C; no fine-tune learns under that, so a target needing it is unmet.
MAX_NOISE = 1e3
REL_TOL = 1e-3  # calibrate_noise's relative tolerance on z
_STATE_VERSION = 1

Events = dict[tuple[float, int], int]  # (z, m) -> how many rounds released it


class Ledger:
    """The rounds' privacy events of one run, and the ε they spend.

    Parameters
    ----------
    population
        ``N``: the clients sampled from (``partition.num_partitions``).
    delta
        δ of the reported (ε, δ) guarantee.
    sampling
        ``"fixed"`` (``m`` clients without replacement) or ``"poisson"`` (each with ``m / N``).
    accountant
        ``"rdp"`` or ``"pld"``: whose ε :meth:`epsilon` and :meth:`would_exceed` use.
    """

    def __init__(
        self, population: int, delta: float, *, sampling: str = "fixed", accountant: str = "rdp"
    ) -> None:
        _check_population(population)
        _check_delta(delta)
        _check_models(sampling, accountant)
        self.population, self.delta = int(population), float(delta)
        self.sampling, self.accountant = sampling, accountant
        self._events: Events = {}
        self._spent: dict[str, float | None] = {}  # ε per accountant, until the next compose

    @property
    def num_releases(self) -> int:
        """Rounds composed so far."""
        return sum(self._events.values())

    def compose(self, noise_multiplier: float, sample_size: int, count: int = 1) -> None:
        """Record ``count`` rounds that each released a sum of clipped updates with noise ``z C``.

        ``sample_size`` is the cohort ``m`` the round sampled (Poisson: its expected size ``q N``),
        not the replies that came back.
        """
        event = _check_event(noise_multiplier, sample_size, self.population)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise FedtuneError(
                f"fed.rounds: a privacy event is composed a positive number of times, got {count!r}"
            )
        self._events[event] = self._events.get(event, 0) + count
        self._spent.clear()

    def epsilon(self) -> float:
        """ε spent so far by the run's accountant (0 before the first round)."""
        spent = self._epsilon(self.accountant)
        assert spent is not None  # the constructor refuses an accountant without this sampling
        return spent

    def epsilons(self) -> dict[str, float | None]:
        """ε spent so far by each accountant: ``{"rdp": ..., "pld": ...}`` (None: not defined here)."""
        return {kind: self._epsilon(kind) for kind in ACCOUNTANTS}

    def would_exceed(self, noise_multiplier: float, sample_size: int, max_epsilon: float) -> bool:
        """Whether one more such round would take the run's ε past ``max_epsilon``; changes nothing."""
        _check_positive(max_epsilon, "privacy.target_epsilon")
        event = _check_event(noise_multiplier, sample_size, self.population)
        events = dict(self._events)
        events[event] = events.get(event, 0) + 1
        spent = _EPSILON[self.accountant](events, self.population, self.delta, self.sampling)
        assert spent is not None
        return spent > max_epsilon

    def _epsilon(self, kind: str) -> float | None:
        if kind not in self._spent:
            self._spent[kind] = _EPSILON[kind](self._events, self.population, self.delta, self.sampling)
        return self._spent[kind]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the settings and each distinct ``[z, m, rounds]``."""
        return {
            "version": _STATE_VERSION,
            "population": self.population,
            "delta": self.delta,
            "sampling": self.sampling,
            "accountant": self.accountant,
            "events": [[z, m, count] for (z, m), count in self._events.items()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output; other settings are refused, naming the key."""
        if state.get("version") != _STATE_VERSION:
            raise FedtuneError(f"privacy ledger: unknown state version {state.get('version')!r}")
        for field, key in (
            ("population", "partition.num_partitions"),
            ("delta", "privacy.delta"),
            ("sampling", "privacy.sampling"),
            ("accountant", "privacy.accountant"),
        ):
            if state.get(field) != getattr(self, field):
                raise FedtuneError(
                    f"{key}: the saved privacy ledger was kept with {field} = {state.get(field)!r}, this "
                    f"run has {getattr(self, field)!r}; resume with the settings the run started with"
                )
        events: Events = {}
        entries = state.get("events")
        if not isinstance(entries, list):
            raise FedtuneError("privacy ledger: the saved state has no list of events")
        for entry in entries:
            if not isinstance(entry, list | tuple) or len(entry) != 3:
                raise FedtuneError(f"privacy ledger: a saved event is not [z, m, rounds]: {entry!r}")
            event = _check_event(entry[0], entry[1], self.population)
            if isinstance(entry[2], bool) or not isinstance(entry[2], int) or entry[2] < 1:
                raise FedtuneError(f"privacy ledger: a saved event's round count is not positive: {entry!r}")
            events[event] = events.get(event, 0) + entry[2]
        self._events = events
        self._spent.clear()


def _rdp_epsilon(events: Events, population: int, delta: float, sampling: str) -> float:
    """ε by Flower's RdpAccountant over the events (z divided by the sum's sensitivity, in C)."""
    if not events:
        return 0.0
    method, relation, sensitivity = SAMPLINGS[sampling]
    config = FlowerPrivacyConfig(
        target_delta=delta, population_size=population, neighboring_relation=relation, sampling_method=method
    )
    accountant = RdpAccountant(config)
    with quiet_absl():
        for (z, m), count in events.items():
            accountant.compose(GaussianPrivacyEvent(z / sensitivity, m, population), count)
        return float(accountant.get_epsilon(delta))


def _pld_epsilon(events: Events, population: int, delta: float, sampling: str) -> float | None:
    """ε by dp-accounting's PLDAccountant; None for fixed-size sampling (see the module docstring)."""
    if sampling != "poisson":
        return None
    if not events:
        return 0.0
    accountant = PLDAccountant(neighboring_relation=DpNeighboringRelation.ADD_OR_REMOVE_ONE)
    for (z, m), count in events.items():
        accountant.compose(dp_event.PoissonSampledDpEvent(m / population, dp_event.GaussianDpEvent(z)), count)
    return float(accountant.get_epsilon(delta))


_EPSILON: dict[str, Callable[[Events, int, float, str], float | None]] = {
    "rdp": _rdp_epsilon,
    "pld": _pld_epsilon,
}


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    population: int,
    sample_size: int,
    rounds: int,
    sampling: str = "fixed",
    accountant: str = "rdp",
) -> float:
    """The smallest noise multiplier ``z`` whose ``rounds`` rounds spend at most ``target_epsilon``.

    ε(z) decreases with ``z``: bracketed by doubling from 1 (capped at :data:`MAX_NOISE`) or
    halving, then bisected geometrically until ``(hi - lo) / hi <= REL_TOL``. The upper end is
    returned, so ``ε(z) <= target_epsilon < ε(z · (1 - REL_TOL))``.

    Parameters
    ----------
    target_epsilon
        ε over the whole run (``privacy.target_epsilon``).
    delta, population, sampling, accountant
        As for :class:`Ledger`.
    sample_size
        ``m``: the cohort of every round (Poisson: its expected size).
    rounds
        Rounds planned (``fed.rounds``).

    Returns
    -------
    float
        ``z``: noise std on the update sum over the clip norm.

    Raises
    ------
    FedtuneError
        Naming the key of an input out of range, or ``privacy.target_epsilon`` when even
        ``z = MAX_NOISE`` spends more than the target.
    """
    _check_positive(target_epsilon, "privacy.target_epsilon")
    _check_population(population)
    _check_delta(delta)
    _check_models(sampling, accountant)
    _check_event(1.0, sample_size, population)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise FedtuneError(
            f"fed.rounds: the rounds to calibrate for must be a positive integer, got {rounds!r}"
        )

    def spent(z: float) -> float:
        value = _EPSILON[accountant]({(z, int(sample_size)): rounds}, population, delta, sampling)
        assert value is not None
        return value

    hi = 1.0
    while (at_hi := spent(hi)) > target_epsilon:
        if hi >= MAX_NOISE:
            raise FedtuneError(
                f"privacy.target_epsilon: ε = {target_epsilon} over {rounds} rounds (m = {sample_size} of "
                f"{population}, δ = {delta:.3g}) is out of reach: even noise multiplier {MAX_NOISE:g} spends "
                f"ε = {at_hi:.4g}; raise the target, sample fewer clients or plan fewer rounds"
            )
        hi = min(2 * hi, MAX_NOISE)
    lo = hi / 2
    while spent(lo) <= target_epsilon:  # a loose target: z below 1
        hi, lo = lo, lo / 2
    while hi - lo > REL_TOL * hi:
        mid = math.sqrt(lo * hi)
        if spent(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def adaptive_noise(z_total: float, clipped_count_stddev: float) -> float:
    """``z_Δ``: the update sum's noise multiplier when adaptive clipping also releases the count.

    Andrew, Thakkar, McMahan & Ramaswamy 2021 ("Differentially private learning with adaptive
    clipping", Thm. 1): releasing the update sum at ``z_Δ`` and the clipped count with std
    ``σ_b`` costs as much as one release at ``z`` when

        ``z_Δ = (z^-2 - (2 σ_b)^-2)^(-1/2)``,

    so the ledger composes ``z`` per round. The ``2`` is the count's sensitivity of 1/2: each
    client adds ``b_i - 1/2`` with ``b_i`` its within-the-clip-norm bit (the server adds the
    halves back with the expected cohort). Under replace-one both sensitivities double, which
    leaves the formula as it is.

    Raises
    ------
    FedtuneError
        Naming ``privacy.clipped_count_stddev`` when ``z >= 2 σ_b``: the count alone would
        spend the whole budget.
    """
    _check_positive(z_total, "privacy.noise_multiplier")
    _check_positive(clipped_count_stddev, "privacy.clipped_count_stddev")
    if z_total >= 2 * clipped_count_stddev:
        raise FedtuneError(
            f"privacy.clipped_count_stddev: {clipped_count_stddev:.4g} is too little noise on the clipped "
            f"count for noise multiplier {z_total:.4g}: the count alone would spend the budget; set it "
            f"above {z_total / 2:.4g}"
        )
    return float((z_total**-2 - (2 * clipped_count_stddev) ** -2) ** -0.5)


def default_delta(population: int) -> float:
    """δ when ``privacy.delta`` is unset: ``1 / N^1.1``.

    Below ``1 / N``, a δ at which publishing one random client's update outright would pass.
    """
    _check_population(population)
    if population < 2:
        raise FedtuneError("partition.num_partitions: client-level DP needs at least 2 clients")
    return float(1 / population**1.1)


def _check_positive(value: float, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise FedtuneError(f"{key}: must be a positive finite number, got {value!r}")


def _check_population(population: int) -> None:
    if isinstance(population, bool) or not isinstance(population, numbers.Integral) or population < 1:
        raise FedtuneError(
            f"partition.num_partitions: the population must be a positive integer, got {population!r}"
        )


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise FedtuneError(f"privacy.delta: δ must lie strictly between 0 and 1, got {delta!r}")


def _check_models(sampling: str, accountant: str) -> None:
    if sampling not in SAMPLINGS:
        raise FedtuneError(f"privacy.sampling: must be one of {sorted(SAMPLINGS)}, got {sampling!r}")
    if accountant not in ACCOUNTANTS:
        raise FedtuneError(f"privacy.accountant: must be one of {list(ACCOUNTANTS)}, got {accountant!r}")
    if accountant == "pld" and sampling != "poisson":
        raise FedtuneError(
            "privacy.accountant: 'pld' needs privacy.sampling = 'poisson' (dp-accounting's PLD accountant "
            "has no fixed-size sampling without replacement); use accountant = 'rdp' or sampling = 'poisson'"
        )


def _check_event(noise_multiplier: float, sample_size: int, population: int) -> tuple[float, int]:
    """The event as ``(z, m)`` with plain Python types, or FedtuneError naming the key."""
    _check_positive(noise_multiplier, "privacy.noise_multiplier")
    if isinstance(sample_size, bool) or not isinstance(sample_size, numbers.Integral):
        raise FedtuneError(
            f"fed.fraction_train: the cohort must be a whole number of clients, got {sample_size!r}"
        )
    if not 1 <= sample_size <= population:
        raise FedtuneError(
            f"fed.fraction_train: the cohort must be 1 to {population} clients (partition.num_partitions), "
            f"got {sample_size}"
        )
    return float(noise_multiplier), int(sample_size)
