"""The clients' learning rate over a federated run (a schedule across rounds).

Within a round a client trains at one learning rate (``train.scheduler`` may still shape
its local steps); across rounds ``fed.lr_schedule`` decays that rate the way a
centralised run's scheduler decays it across steps, as OpenFedLLM does with its
per-round cosine. Round ``t`` of ``R`` takes the value a Hugging Face scheduler over
``R`` steps has at step ``t - 1``: round 1 trains at the full ``train.lr``, and with
K clients a round of one step each, round ``t`` matches step ``K (t - 1)`` of a
centralised run of ``K R`` steps on the same schedule.
"""

from __future__ import annotations

import math
from typing import get_args

from fedtune.config import Config, Schedule

SCHEDULES: tuple[str, ...] = get_args(Schedule)


def round_lr(lr: float, server_round: int, rounds: int, schedule: str, min_ratio: float = 0.0) -> float:
    """The learning rate of ``server_round`` (1-based) in a run of ``rounds`` rounds.

    ``constant`` keeps ``lr``; ``linear`` and ``cosine`` decay from ``lr`` in round 1 towards
    ``min_ratio * lr``, reached after the last round (as transformers' schedulers do).
    Round 0 (evaluation before training) and rounds past ``rounds`` (a resumed run whose
    round count grew) are clamped into range.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"fed.lr_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if rounds < 1:
        raise ValueError(f"fed.rounds must be >= 1, got {rounds}")
    progress = min(max(server_round - 1, 0), rounds) / rounds
    if schedule == "constant":
        factor = 1.0
    elif schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (min_ratio + (1.0 - min_ratio) * factor)


def at_round(cfg: Config, server_round: int) -> Config:
    """``cfg`` with ``train.lr`` set to its value in ``server_round`` under ``fed.lr_schedule``."""
    fed = cfg.fed
    if fed.lr_schedule == "constant":
        return cfg
    lr = round_lr(cfg.train.lr, server_round, fed.rounds, fed.lr_schedule, fed.lr_min_ratio)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": lr})})
