"""The privacy plan of a run, worked out (and refused) before a run directory is made.

:func:`dp_plan` turns the ``privacy`` section and the run's sampling into the numbers the
server uses every round: the cohort size ``m``, δ, the accounted noise multiplier ``z``
(given, or calibrated to ``privacy.target_epsilon`` over ``fed.rounds``), the noise actually
put on the update sum ``z_Δ`` (equal to ``z`` unless adaptive clipping spends part of the
budget on the clipped count) and that count's noise ``σ_b``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedtune.config import Config
from fedtune.errors import FedtuneError
from fedtune.privacy.accounting import Ledger, adaptive_noise, calibrate_noise, default_delta
from fedtune.privacy.dpfedavg import cohort_size


@dataclass(frozen=True)
class DpPlan:
    """What one run's client-level DP does each round (see the module docstring)."""

    population: int
    cohort: int
    delta: float
    noise_multiplier: float  # z: what the accountant composes each round
    update_noise: float  # z_Δ: the noise on the update sum, over the clip norm
    count_std: float | None  # σ_b: adaptive clipping's noise on the count within the clip norm
    target_epsilon: float | None
    sampling: str
    accountant: str


def check_dp_config(cfg: Config) -> None:
    """Refuse settings under which the DP guarantee would not hold, naming the key."""
    if cfg.fed.outlier_norm_factor is not None:
        raise FedtuneError(
            "fed.outlier_norm_factor: with privacy.dp an update's fate would depend on the others' "
            "norms, which breaks the sensitivity bound; unset it (every update is clipped anyway)"
        )
    if cfg.model.lora.ranks is not None:
        raise FedtuneError("model.lora.ranks: client-level DP needs one adapter shape for every client")


def check_privacy(cfg: Config) -> DpPlan | None:
    """Everything the ``privacy`` section can refuse before a run directory exists; the DP plan."""
    if cfg.privacy.local_dp.enabled and cfg.split.enabled:
        raise FedtuneError(
            "privacy.local_dp: DP-SGD runs in the clients' own training loop, not in split runs"
        )
    return dp_plan(cfg) if cfg.privacy.dp else None


def dp_plan(cfg: Config) -> DpPlan:
    """The run's DP plan; FedtuneError naming the key when the plan cannot meet its target."""
    privacy = cfg.privacy
    check_dp_config(cfg)
    population = cfg.partition.num_partitions
    cohort = cohort_size(population, cfg.fed.fraction_train, cfg.fed.min_train_clients)
    delta = privacy.delta if privacy.delta is not None else default_delta(population)
    if privacy.noise_multiplier is not None:
        z = privacy.noise_multiplier
        if privacy.target_epsilon is not None:  # a budget the run stops at: one round must fit
            ledger = Ledger(population, delta, sampling=privacy.sampling, accountant=privacy.accountant)
            if ledger.would_exceed(z, cohort, privacy.target_epsilon):
                raise FedtuneError(
                    f"privacy.target_epsilon={privacy.target_epsilon}: one round at privacy.noise_multiplier="
                    f"{z} already spends more; raise the noise or the target"
                )
    else:
        assert privacy.target_epsilon is not None  # the config's validator
        z = calibrate_noise(
            privacy.target_epsilon,
            delta,
            population=population,
            sample_size=cohort,
            rounds=cfg.fed.rounds,
            sampling=privacy.sampling,
            accountant=privacy.accountant,
        )
    count_std = None
    update_noise = z
    if privacy.adaptive_clipping:
        count_std = privacy.clipped_count_stddev or cohort / 20
        update_noise = adaptive_noise(z, count_std)
    _check_secagg_range(cfg, update_noise, cohort)
    return DpPlan(
        population=population,
        cohort=cohort,
        delta=delta,
        noise_multiplier=z,
        update_noise=update_noise,
        count_std=count_std,
        target_epsilon=privacy.target_epsilon,
        sampling=privacy.sampling,
        accountant=privacy.accountant,
    )


def _check_secagg_range(cfg: Config, update_noise: float, cohort: int) -> None:
    """Refuse a SecAgg+ clipping range that would cut a clipped update or its noise share.

    Under SecAgg+ every coordinate is clipped to ±``privacy.secagg.clipping_range`` before it
    is quantised; an update within ``privacy.clip_norm`` plus a client's noise share must fit,
    or the clipping would cut the noise (and with it the guarantee).
    """
    privacy = cfg.privacy
    if not privacy.secagg.enabled:
        return
    share = update_noise * privacy.clip_norm / math.sqrt(cohort) if privacy.noise == "client" else 0.0
    reach = privacy.clip_norm + 8 * share  # a coordinate of the update + 8 standard deviations of noise
    if reach > privacy.secagg.clipping_range:
        raise FedtuneError(
            f"privacy.secagg.clipping_range: {privacy.secagg.clipping_range} would cut updates of norm "
            f"privacy.clip_norm={privacy.clip_norm} plus their noise shares (up to {reach:.3g}); raise it"
        )
