"""DP-SGD on the client (privacy.local_dp): per-example clipping, noise, accounting."""

from __future__ import annotations

from itertools import islice

import pytest
import torch
from datasets import Dataset
from dp_accounting import dp_event, rdp
from opacus.accountants import RDPAccountant

from fedtune.config import Config, LoraConfig, ModelConfig, TrainConfig
from fedtune.errors import FedtuneError
from fedtune.models.adapters import adapter_state, attach_lora
from fedtune.models.load import load_model, load_tokenizer
from fedtune.privacy.local_dp import (
    LocalDp,
    PrivateGradients,
    clip_and_sum,
    local_dp_setup,
    local_epsilon,
    per_example_loss,
)
from fedtune.training.local import evaluate, make_loader, planned_steps, train

TINY = ModelConfig(name="tiny-llama", lora=LoraConfig(r=4, alpha=8, dropout=0.0))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


def _data(n: int = 8) -> Dataset:
    rows = []
    for i in range(n):
        ids = [1, 20 + i % 3, 30 + i % 2, 40, 50 + i % 4, 2]
        labels = [-100, -100, -100, 40, 50 + i % 4, 2]  # three answer tokens in every example
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return Dataset.from_list(rows)


def _fresh() -> torch.nn.Module:
    return attach_lora(load_model(TINY), TINY.lora, seed=0)


def _dp(cfg: TrainConfig, n: int = 8, *, clip: float, noise: float, seed: int | None = 0) -> LocalDp:
    return LocalDp(
        max_grad_norm=clip,
        noise_multiplier=noise,
        batch_size=cfg.batch_size * cfg.grad_accum,
        num_examples=n,
        steps_per_round=planned_steps(cfg, n),
        delta=1e-3,
        seed=seed,
    )


def _trained(tokenizer, cfg: TrainConfig, dp: LocalDp | None, n: int = 8) -> dict[str, torch.Tensor]:
    model = _fresh()
    train(model, _data(n), tokenizer, cfg, seed=1, dp=dp)
    return adapter_state(model)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5)


def test_per_example_loss_is_the_mean_over_each_examples_answer_tokens() -> None:
    # vocabulary of 2, uniform logits: every labelled token costs ln 2
    logits = torch.zeros(2, 4, 2)
    labels = torch.tensor([[-100, 0, 1, -100], [-100, -100, -100, -100]])
    assert per_example_loss(logits, labels).tolist() == pytest.approx([0.6931472, 0.0])


def test_clip_and_sum_bounds_each_example_by_hand() -> None:
    # example 0: norm sqrt(3^2 + 4^2) = 5 -> scaled to 1; example 1: norm 0.5 stays
    a = torch.tensor([[3.0], [0.3]])
    b = torch.tensor([[4.0], [0.4]])
    (sum_a, sum_b), norms = clip_and_sum([a, b], max_norm=1.0)
    assert norms.tolist() == pytest.approx([5.0, 0.5])
    assert sum_a.item() == pytest.approx(3 / 5 + 0.3, rel=1e-5)
    assert sum_b.item() == pytest.approx(4 / 5 + 0.4, rel=1e-5)


def test_without_clipping_or_noise_dp_sgd_takes_the_plain_step(tokenizer) -> None:
    # B = 4 x 2 = n: q = 1, so every step samples all 8 examples, as the plain steps take them.
    # The sum of per-example gradients / 8 is then the batch gradient (every example has three
    # answer tokens, so the token mean is the mean of the example means).
    cfg = TrainConfig(max_steps=2, batch_size=4, grad_accum=2, optimizer="sgd", lr=0.5, max_grad_norm=None)
    plain = _trained(tokenizer, cfg, None)
    private = _trained(tokenizer, cfg, _dp(cfg, clip=1e6, noise=0.0))
    start = adapter_state(_fresh())
    assert _distance(plain, start) > 1e-3
    assert _distance(private, plain) < 1e-4 * _distance(plain, start)


def test_a_tiny_bound_clips_every_examples_contribution(tokenizer) -> None:
    # q = 1; one SGD step moves the adapter by lr * ||(1/B) sum_i clip(g_i)|| <= lr * C,
    # with equality for one example
    clip, lr = 1e-3, 1.0
    start = adapter_state(_fresh())
    for n, exact in ((1, True), (4, False)):
        cfg = TrainConfig(max_steps=1, batch_size=n, optimizer="sgd", lr=lr, max_grad_norm=None)
        moved = _distance(_trained(tokenizer, cfg, _dp(cfg, n, clip=clip, noise=0.0), n), start)
        assert moved == pytest.approx(lr * clip, rel=1e-3) if exact else 0 < moved <= lr * clip * (1 + 1e-4)


def test_noise_changes_the_step_and_is_reproducible_from_its_seed(tokenizer) -> None:
    cfg = TrainConfig(max_steps=1, batch_size=4, optimizer="sgd", lr=1.0, max_grad_norm=None)

    def run(noise: float, seed: int) -> dict[str, torch.Tensor]:
        return _trained(tokenizer, cfg, _dp(cfg, 4, clip=1.0, noise=noise, seed=seed), 4)

    quiet, noisy, again, other = run(0.0, 7), run(1.0, 7), run(1.0, 7), run(1.0, 8)
    assert all(torch.equal(noisy[k], again[k]) for k in noisy)
    assert _distance(noisy, quiet) > 0 and _distance(noisy, other) > 0
    # q = 1: the step's noise is N(0, (z C / B)^2) on each coordinate, times lr
    coords = sum(v.numel() for v in noisy.values())
    assert _distance(noisy, quiet) == pytest.approx(1.0 * 1.0 / 4 * coords**0.5, rel=0.05)


def test_batches_are_poisson_sampled_from_the_seed(tokenizer) -> None:
    # q = 4 / 40: a step's batch has Binomial(40, 0.1) examples, in micro-batches of at most 2
    cfg = TrainConfig(max_steps=200, batch_size=2, grad_accum=2)
    loader = make_loader(_data(40), tokenizer, 2, shuffle=False)
    sizes = []
    for seed in (3, 3):
        steps = PrivateGradients(_fresh(), _dp(cfg, 40, clip=1.0, noise=1.0, seed=seed), cfg, 200)
        micro = list(islice(steps.sampled_steps(loader), 200))
        assert all(len(b["input_ids"]) <= 2 for step in micro for b in step)
        sizes.append([sum(len(b["input_ids"]) for b in step) for step in micro])
    assert sizes[0] == sizes[1]
    assert sum(sizes[0]) / 200 == pytest.approx(4, abs=0.5)  # mean 4, std of the mean 0.13
    assert 0 in sizes[0] and max(sizes[0]) > 4  # P(empty) = 0.9^40 = 1.5%


def _config(**local_dp) -> Config:
    return Config.model_validate(
        {
            "train": {"max_steps": 5, "batch_size": 4, "grad_accum": 2},
            "fed": {"rounds": 10},
            "privacy": {"local_dp": {"enabled": True, **local_dp}},
        }
    )


def test_epsilon_matches_dp_accounting_and_opacus() -> None:
    dp = local_dp_setup(_config(noise_multiplier=1.1), num_examples=200, steps_per_round=5)
    assert dp is not None
    # q = 4 * 2 / 200; round 3 of 5 steps each; delta = 1 / 200^1.1
    q, steps, delta = 0.04, 15, 1 / 200**1.1
    assert (dp.sample_rate, dp.delta) == pytest.approx((q, delta))
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(1.1)), steps)
    assert local_epsilon(dp, server_round=3) == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    opacus = RDPAccountant()
    opacus.history = [(1.1, q, steps)]
    assert local_epsilon(dp, server_round=3) == pytest.approx(opacus.get_epsilon(delta), rel=0.05)
    assert local_epsilon(dp, server_round=4) > local_epsilon(dp, server_round=3)


def test_target_epsilon_calibrates_the_noise_for_the_whole_run() -> None:
    dp = local_dp_setup(_config(target_epsilon=2.0, delta=1e-5), num_examples=200, steps_per_round=5)
    assert dp is not None and dp.noise_multiplier > 0
    spent = local_epsilon(dp, server_round=10)  # fed.rounds
    assert 1.95 <= spent <= 2.0


def test_setup_off_or_without_a_delta() -> None:
    assert local_dp_setup(Config(), num_examples=10, steps_per_round=5) is None
    with pytest.raises(FedtuneError, match=r"privacy\.local_dp"):
        local_dp_setup(_config(noise_multiplier=1.0), num_examples=1, steps_per_round=5)


def test_a_round_that_does_not_match_the_setup_is_refused(tokenizer) -> None:
    cfg = TrainConfig(max_steps=2, batch_size=4)
    with pytest.raises(ValueError, match=r"privacy\.local_dp"):
        train(_fresh(), _data(), tokenizer, cfg, seed=1, dp=_dp(TrainConfig(max_steps=3), clip=1, noise=1))
    with pytest.raises(ValueError, match=r"privacy\.local_dp"):
        train(_fresh(), _data(6), tokenizer, cfg, seed=1, dp=_dp(cfg, clip=1, noise=1))


def test_fedprox_and_the_hooks_leave_no_trace(tokenizer) -> None:
    cfg = TrainConfig(max_steps=2, batch_size=4, optimizer="sgd", lr=1.0, max_grad_norm=None)
    model = _fresh()
    train(model, _data(), tokenizer, cfg, seed=1, dp=_dp(cfg, clip=1.0, noise=0.0), proximal_mu=0.1)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(hasattr(m, "activations") for m in model.modules())
    # the model trains with DP again (opacus refuses hooks added twice)
    train(model, _data(), tokenizer, cfg, seed=2, dp=_dp(cfg, clip=1.0, noise=0.0))


def test_loss_still_falls_with_moderate_noise(tokenizer) -> None:
    # 10 AdamW steps, q = 4 / 8: the loss falls by 0.54 without noise (as the plain loop), and by
    # 0.27-0.39 with z = 0.5 (noise seeds 0-2; this one is seed 0)
    cfg = TrainConfig(max_steps=10, batch_size=4, lr=1e-2)
    model = _fresh()
    before = evaluate(model, _data(), tokenizer, batch_size=4).loss
    train(model, _data(), tokenizer, cfg, seed=1, dp=_dp(cfg, clip=1.0, noise=0.5))
    after = evaluate(model, _data(), tokenizer, batch_size=4).loss
    assert after < before - 0.2
