import math

import pytest
import torch
from transformers import get_scheduler

from fedtune.config import validate
from fedtune.training.schedule import at_round, round_lr


def test_constant_keeps_lr():
    assert [round_lr(1e-3, t, 4, "constant") for t in (1, 2, 4)] == [1e-3, 1e-3, 1e-3]


def test_linear_hand_worked():
    # 4 rounds: factors 1, 3/4, 1/2, 1/4 (the floor 0 is reached after the last round)
    assert [round_lr(8.0, t, 4, "linear") for t in (1, 2, 3, 4)] == pytest.approx([8.0, 6.0, 4.0, 2.0])


def test_cosine_hand_worked_with_floor():
    # round 3 of 4: progress 1/2, cosine factor 1/2; floor 0.2: 0.2 + 0.8 * 0.5 = 0.6
    assert round_lr(10.0, 3, 4, "cosine", min_ratio=0.2) == pytest.approx(6.0)
    # round 2 of 4: factor (1 + cos(pi/4)) / 2
    assert round_lr(1.0, 2, 4, "cosine") == pytest.approx((1 + math.sqrt(0.5)) / 2)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_round_t_matches_transformers_step_k_t_minus_1(schedule):
    """K clients a round x 1 step: round t has the lr of step K(t-1) of a K*R-step run."""
    rounds, k, lr = 6, 2, 3e-3
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    sched = get_scheduler(schedule, optimizer, num_warmup_steps=0, num_training_steps=k * rounds)
    per_step = []
    for _ in range(k * rounds):
        per_step.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    ours = [round_lr(lr, t, rounds, schedule) for t in range(1, rounds + 1)]
    assert ours == pytest.approx(per_step[::k])


def test_out_of_range_rounds_are_clamped():
    assert round_lr(1.0, 0, 4, "linear") == 1.0  # evaluation before training
    assert round_lr(1.0, 9, 4, "linear", min_ratio=0.1) == pytest.approx(0.1)


def test_bad_schedule_names_the_key():
    with pytest.raises(ValueError, match=r"fed\.lr_schedule"):
        round_lr(1.0, 1, 4, "step")


def test_at_round_replaces_only_train_lr():
    cfg = validate({"train": {"lr": 0.01}, "fed": {"rounds": 2, "lr_schedule": "linear"}}, source="t")
    second = at_round(cfg, 2)
    assert second.train.lr == pytest.approx(0.005)
    assert cfg.train.lr == 0.01  # the original is untouched
    assert second.model_dump(exclude={"train"}) == cfg.model_dump(exclude={"train"})
    constant = validate({"train": {"lr": 0.01}}, source="t")
    assert at_round(constant, 2) is constant
