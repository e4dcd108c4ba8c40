"""The server's side of client-level DP-FedAvg: sampling, the noised mean, the clip norm, the ledger.

:class:`ServerDp` is owned by the strategy (:class:`~fedtune.federated.strategies.base.AdapterStrategy`)
and holds everything that must survive a resume: the secret seed of the noise and the
sampling, the current clip norm and the accountant's event ledger. :meth:`ServerDp.state`
packs them into the arrays the round loop checkpoints with every round, so ``--resume``
continues with the same noise, the same samples and the same ε.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from fedtune.config import Config
from fedtune.privacy.accounting import Ledger
from fedtune.privacy.dpfedavg import Arrays, adaptive_clip, dp_sample, noised_mean
from fedtune.privacy.plan import DpPlan, dp_plan

log = logging.getLogger(__name__)

_SEED = "privacy.seed"
_CLIP = "privacy.clip-norm"
_LEDGER = "privacy.ledger"
# the noise, the sample and the clipped count of a round each have their own stream
_NOISE, _SAMPLE, _COUNT = 0, 1, 2


class ServerDp:
    """Client-level DP for one run: see the module docstring."""

    def __init__(self, cfg: Config, plan: DpPlan | None = None) -> None:
        self.cfg = cfg
        self.plan = plan or dp_plan(cfg)
        self.seed = secrets.randbits(63)  # replaced by the checkpointed one on resume
        self.clip_norm = cfg.privacy.clip_norm
        self.ledger = self._new_ledger()

    def _new_ledger(self) -> Ledger:
        p = self.plan
        return Ledger(p.population, p.delta, sampling=p.sampling, accountant=p.accountant)

    def _rng(self, server_round: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, server_round, stream])

    # -- before a round -----------------------------------------------------------------
    def sample(self, partition_ids: Iterable[int], server_round: int) -> list[int]:
        """The round's clients, drawn with the secret seed (fixed-size or Poisson)."""
        return dp_sample(
            partition_ids, self.plan.cohort, self.plan.sampling, self._rng(server_round, _SAMPLE)
        )

    @property
    def client_noise_std(self) -> float | None:
        """Std of each client's noise share (``privacy.noise = "client"``), else None."""
        if self.cfg.privacy.noise != "client":
            return None
        return self.plan.update_noise * self.clip_norm / math.sqrt(self.plan.cohort)

    def would_exceed(self) -> bool:
        """Whether one more round at the planned noise would take ε past ``privacy.target_epsilon``."""
        target = self.plan.target_epsilon
        if target is None:
            return False
        return self.ledger.would_exceed(self.plan.noise_multiplier, self.plan.cohort, target)

    def max_delta_norm(self, dims: int) -> float:
        """The largest update norm an honest client sends: ``C``, plus its noise share's tail."""
        bound = self.clip_norm * (1 + 1e-4)
        std = self.client_noise_std
        if std is not None:  # ‖N(0, s² I_d)‖ ≤ s (√d + 8) but with probability ≈ e^-32
            bound += std * (math.sqrt(dims) + 8)
        return bound

    # -- after a round ------------------------------------------------------------------
    def aggregate(
        self,
        deltas: Sequence[Arrays],
        within: Sequence[bool],
        template: Arrays,
        server_round: int,
        *,
        count: int | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The noised mean update of the round and the round's privacy figures.

        ``deltas`` are the accepted, clipped updates (or, under SecAgg+, their sum alone, with
        ``count`` the clients in it); ``within`` their clipped-count bits.
        Composes the round's privacy event (also when no update arrived, since the noise is
        released anyway), then moves the clip norm when adaptive.
        """
        p, client_noise = self.plan, self.cfg.privacy.noise == "client"
        noise_std = 0.0 if client_noise else p.update_noise * self.clip_norm
        mean, noise_norm, signal_norm = noised_mean(
            deltas, template, expected_size=p.cohort, noise_std=noise_std, rng=self._rng(server_round, _NOISE)
        )
        z, count = p.noise_multiplier, len(deltas) if count is None else count
        if client_noise:  # the shares that arrived: fewer replies, less noise
            z *= math.sqrt(count / p.cohort)
            dims = sum(v.size for v in template.values())
            noise_norm = p.update_noise * self.clip_norm * math.sqrt(dims * count) / p.cohort
        if z > 0:
            self.ledger.compose(z, p.cohort)
        figures: dict[str, Any] = {"noise_multiplier": z, "clip_norm": self.clip_norm}
        figures["noise_to_signal"] = noise_norm / signal_norm if signal_norm > 0 else None
        if self.cfg.privacy.adaptive_clipping:
            assert p.count_std is not None
            self.clip_norm, figures["within_share"] = adaptive_clip(
                self.clip_norm,
                sum(within),
                len(within),
                expected_size=p.cohort,
                count_std=p.count_std,
                target_quantile=self.cfg.privacy.target_quantile,
                clip_lr=self.cfg.privacy.clip_lr,
                rng=self._rng(server_round, _COUNT),
            )
        figures.update(self.spent())
        return mean, figures

    def spent(self, *, both: bool = False) -> dict[str, float | None]:
        """ε so far by the run's accountant (``epsilon``, and as ``epsilon_rdp`` / ``epsilon_pld``).

        ``both``: the other accountant's too (PLD takes ~0.3 s, so rounds report only the run's own;
        ``final/privacy.json`` has both).
        """
        epsilon = self.ledger.epsilon()
        out: dict[str, float | None] = {"epsilon": epsilon, f"epsilon_{self.plan.accountant}": epsilon}
        if both:
            out |= {f"epsilon_{kind}": value for kind, value in self.ledger.epsilons().items()}
        return out

    def summary(self) -> dict[str, Any]:
        """What ``final/privacy.json`` says: the guarantee, and how it was obtained."""
        p = self.plan
        return {
            "guarantee": "client-level (ε, δ)-DP of the released adapters",
            "delta": p.delta,
            **self.spent(both=True),
            "accountant": p.accountant,
            "rounds_accounted": self.ledger.num_releases,
            "noise_multiplier": p.noise_multiplier,
            "update_noise_multiplier": p.update_noise,
            "clipped_count_stddev": p.count_std,
            "clip_norm": self.clip_norm,
            "sampling": p.sampling,
            "cohort": p.cohort,
            "population": p.population,
            "noise": self.cfg.privacy.noise,
            "target_epsilon": p.target_epsilon,
        }

    # -- checkpoint ---------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """The seed, clip norm and ledger as arrays, for the round's ``server_state``."""
        ledger = json.dumps(self.ledger.state_dict(), sort_keys=True).encode()
        return {
            _SEED: np.array([self.seed], dtype=np.int64),
            _CLIP: np.array([self.clip_norm], dtype=np.float64),
            _LEDGER: np.frombuffer(ledger, dtype=np.uint8).copy(),
        }

    def load(self, state: Arrays) -> None:
        """Restore :meth:`state` (nothing saved yet: a fresh run keeps its new seed)."""
        if _SEED not in state:
            return
        self.seed = int(state[_SEED][0])
        self.clip_norm = float(state[_CLIP][0])
        self.ledger = self._new_ledger()
        self.ledger.load_state_dict(json.loads(bytes(state[_LEDGER].astype(np.uint8)).decode()))
        log.info(
            "privacy: resumed at ε = %.4g after %s rounds", self.ledger.epsilon(), self.ledger.num_releases
        )


def split_state(state: Arrays) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A checkpoint's arrays split into (the strategy's, the privacy state's)."""
    mine = {k: np.asarray(v) for k, v in state.items() if k.startswith("privacy.")}
    return {k: np.asarray(v) for k, v in state.items() if k not in mine}, mine
