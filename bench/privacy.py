"""fedtune's ε (``fedtune.privacy.accounting``) against dp-accounting called directly.

For every noise multiplier ``z`` in {0.6, 1, 2}, cohort ``m`` = {1, 10, 50} % of ``N`` in
{100, 1000}, rounds in {10, 100, 500} and both samplings, a :class:`Ledger` composes one
event per round; the same composition is then built here from dp-accounting's own events:

- poisson: ``PoissonSampledDpEvent(m / N, GaussianDpEvent(z))`` x rounds, add-or-remove-one,
  with ``rdp.RdpAccountant`` and ``pld.PLDAccountant``;
- fixed: ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))`` x rounds,
  replace-one, with ``rdp.RdpAccountant`` (dp-accounting's PLD has no such event). The ``/ 2``:
  replacing a client moves the update sum by up to ``2C`` and this RDP reads its noise
  multiplier over that sensitivity; the second table checks that reading against the exact
  ε of the Gaussian mechanism (Balle & Wang 2018), independent of both libraries.

Then ``calibrate_noise`` for ε in {1, 8} over 100 rounds: dp-accounting must find the
calibrated ``z`` within the target, and ``z (1 - REL_TOL)`` past it.

Usage: python bench/privacy.py [--delta 1e-5] [--rounds 10,100,500]
Last line: ``epsilon_relative_error: X``, the largest |fedtune - dp-accounting| / dp-accounting
over the grid (goal: 0 up to float rounding).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
import time

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from fedtune.privacy.accounting import REL_TOL, Ledger, calibrate_noise

NOISES = (0.6, 1.0, 2.0)
FRACTIONS = (0.01, 0.1, 0.5)
POPULATIONS = (100, 1000)
REL = dp_accounting.NeighboringRelation


def direct(kind: str, sampling: str, z: float, m: int, n: int, rounds: int, delta: float) -> float | None:
    """ε of ``rounds`` identical releases, composed with dp-accounting's own events and accountants."""
    if sampling == "poisson":
        event = dp_event.PoissonSampledDpEvent(m / n, dp_event.GaussianDpEvent(z))
        relation = REL.ADD_OR_REMOVE_ONE
    else:
        if kind == "pld":
            return None
        event = dp_event.SampledWithoutReplacementDpEvent(n, m, dp_event.GaussianDpEvent(z / 2))
        relation = REL.REPLACE_ONE
    accountant = RdpAccountant(neighboring_relation=relation) if kind == "rdp" else PLDAccountant(relation)
    accountant.compose(dp_event.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """ε at δ of the Gaussian mechanism with sensitivity / std = mu (Balle & Wang 2018, Thm. 8)."""

    def excess(eps: float) -> float:
        # e^ε Φ(·) in log space: e^ε alone overflows for the large μ of many rounds at small z
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2)) - delta

    return float(brentq(excess, 0.0, 50 * mu + 50))


def relative_error(ours: float | None, theirs: float | None) -> float:
    if ours is None and theirs is None:
        return 0.0
    if ours is None or theirs is None:
        return math.inf
    return abs(ours - theirs) / theirs


def grid(delta: float, rounds_grid: list[int]) -> float:
    print(f"\nε at δ = {delta:g}: fedtune's Ledger (one compose per round) vs dp-accounting direct")
    print(
        f"{'sampling':<8} {'N':>5} {'m':>4} {'z':>4} {'rounds':>6} {'rdp':>10} {'direct':>10} "
        f"{'pld':>10} {'direct':>10} {'rel.err':>8}"
    )
    worst = 0.0
    for sampling, n, fraction, z, rounds in itertools.product(
        ("fixed", "poisson"), POPULATIONS, FRACTIONS, NOISES, rounds_grid
    ):
        m = round(fraction * n)
        ledger = Ledger(n, delta, sampling=sampling)
        for _ in range(rounds):
            ledger.compose(z, m)
        ours = ledger.epsilons()
        theirs = {kind: direct(kind, sampling, z, m, n, rounds, delta) for kind in ("rdp", "pld")}
        err = max(relative_error(ours[k], theirs[k]) for k in ("rdp", "pld"))
        worst = max(worst, err)
        pld, pld_direct = (
            f"{v:10.4f}" if v is not None else f"{'-':>10}" for v in (ours["pld"], theirs["pld"])
        )
        print(
            f"{sampling:<8} {n:>5} {m:>4} {z:>4} {rounds:>6} {ours['rdp']:10.4f} {theirs['rdp']:10.4f} "
            f"{pld} {pld_direct} {err:8.1e}"
        )
    return worst


def fixed_convention(delta: float, rounds_grid: list[int]) -> bool:
    print("\nfixed-size, m = N (no amplification): RDP ε >= the exact Gaussian ε at sensitivity 2C")
    print(f"{'z':>4} {'rounds':>6} {'rdp':>10} {'exact':>10} {'exact(C)':>10} {'ok':>4}")
    ok = True
    for z, rounds in itertools.product(NOISES, rounds_grid):
        ledger = Ledger(10, delta, sampling="fixed")
        ledger.compose(z, 10, count=rounds)
        spent = ledger.epsilon()
        exact = exact_gaussian_epsilon(2 * math.sqrt(rounds) / z, delta)
        exact_c = exact_gaussian_epsilon(math.sqrt(rounds) / z, delta)  # had z been read over C
        ok &= exact <= spent
        print(f"{z:>4} {rounds:>6} {spent:10.4f} {exact:10.4f} {exact_c:10.4f} {exact <= spent!s:>4}")
    return ok


def calibration(delta: float) -> tuple[float, bool]:
    print("\ncalibrate_noise -> compose 100 rounds -> ε <= target (N = 1000; direct: dp-accounting)")
    print(
        f"{'sampling':<8} {'acct':<4} {'m':>4} {'target':>6} {'z':>8} {'ε(z)':>8} {'direct':>8} "
        f"{'ε(z(1-tol))':>11} {'s':>5} {'ok':>4}"
    )
    worst, ok, n, rounds = 0.0, True, 1000, 100
    for (sampling, kind), fraction, target in itertools.product(
        (("fixed", "rdp"), ("poisson", "rdp"), ("poisson", "pld")), (0.01, 0.1), (1.0, 8.0)
    ):
        m = round(fraction * n)
        t0 = time.perf_counter()
        z = calibrate_noise(target, delta, n, m, rounds, sampling=sampling, accountant=kind)
        secs = time.perf_counter() - t0
        ledger = Ledger(n, delta, sampling=sampling, accountant=kind)
        for _ in range(rounds):
            ledger.compose(z, m)
        theirs = direct(kind, sampling, z, m, n, rounds, delta)
        below = direct(kind, sampling, z * (1 - REL_TOL), m, n, rounds, delta)
        assert theirs is not None and below is not None
        good = ledger.epsilon() <= target and theirs <= target < below
        ok &= good
        worst = max(worst, relative_error(ledger.epsilon(), theirs))
        print(
            f"{sampling:<8} {kind:<4} {m:>4} {target:>6} {z:8.4f} {ledger.epsilon():8.4f} {theirs:8.4f} "
            f"{below:11.4f} {secs:5.1f} {good!s:>4}"
        )
    return worst, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--rounds", default="10,100,500", help="comma-separated round counts of the grid")
    args = parser.parse_args()
    rounds_grid = [int(r) for r in args.rounds.split(",")]
    # dp-accounting logs each RDP order it drops (fractional orders that do not converge)
    logging.getLogger("absl").setLevel(logging.ERROR)

    t0 = time.perf_counter()
    worst = grid(args.delta, rounds_grid)
    convention_ok = fixed_convention(args.delta, rounds_grid)
    calib_err, calib_ok = calibration(args.delta)
    print(f"\nseconds: {time.perf_counter() - t0:.0f}")
    print(f"fixed_sampling_sensitivity_ok: {convention_ok}")
    print(f"calibration_ok: {calib_ok}")
    print(f"epsilon_relative_error: {max(worst, calib_err):.2e}")
    if not (convention_ok and calib_ok):
        sys.exit(1)


if __name__ == "__main__":
    main()
