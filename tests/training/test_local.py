import pytest
import torch
from datasets import Dataset

from fedtune.config import LoraConfig, ModelConfig, TrainConfig
from fedtune.models.adapters import adapter_state, attach_lora
from fedtune.models.load import load_model, load_tokenizer
from fedtune.training.local import evaluate, planned_steps, train

TINY = ModelConfig(name="tiny-llama", lora=LoraConfig(r=4, alpha=8, dropout=0.0))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


def _data(n: int = 8) -> Dataset:
    rows = []
    for i in range(n):
        ids = [1, 20 + i % 3, 30, 40, 50, 2]
        labels = [-100, -100, -100, 40, 50, 2]  # loss on the last three tokens only
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids), "category": "x"})
    return Dataset.from_list(rows)


def _fresh():
    return attach_lora(load_model(TINY), TINY.lora, seed=0)


def test_training_lowers_loss_and_is_seeded(tokenizer) -> None:
    cfg = TrainConfig(max_steps=8, batch_size=4, lr=1e-2)
    model = _fresh()
    before = evaluate(model, _data(), tokenizer, batch_size=4).loss
    result = train(model, _data(), tokenizer, cfg, seed=1)
    after = evaluate(model, _data(), tokenizer, batch_size=4).loss
    assert result.steps == 8 and result.num_examples == 8
    assert after < before - 0.5
    again = _fresh()
    train(again, _data(), tokenizer, cfg, seed=1)
    a, b = adapter_state(model), adapter_state(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_loss_matches_the_models_own_loss_on_one_example(tokenizer) -> None:
    model = _fresh()
    ds = _data(1)
    ours = evaluate(model, ds, tokenizer, batch_size=1)
    batch = {k: torch.tensor([ds[0][k]]) for k in ("input_ids", "labels", "attention_mask")}
    with torch.no_grad():
        theirs = model(**batch).loss.item()
    assert ours.loss == pytest.approx(theirs, rel=1e-5)
    assert ours.num_tokens == 3  # three labelled tokens, each predicted from the one before


def test_eval_is_token_weighted_not_batch_mean(tokenizer) -> None:
    model = _fresh()
    short = {"input_ids": [1, 5, 6], "labels": [-100, 5, 6], "attention_mask": [1, 1, 1]}
    long = {"input_ids": [1, 7, 8, 9, 10, 11], "labels": [-100, 7, 8, 9, 10, 11], "attention_mask": [1] * 6}
    per = [evaluate(model, Dataset.from_list([x]), tokenizer, 1) for x in (short, long)]
    both = evaluate(model, Dataset.from_list([short, long]), tokenizer, 2)
    expected = (per[0].loss * 2 + per[1].loss * 5) / 7  # 2 and 5 labelled tokens
    assert both.loss == pytest.approx(expected, rel=1e-4)


def test_planned_steps_from_epochs() -> None:
    # 10 examples, batch 4 -> 3 batches per epoch; 2 epochs / accumulation 2 -> 3 steps
    assert planned_steps(TrainConfig(epochs=2, batch_size=4, grad_accum=2), 10) == 3
    assert planned_steps(TrainConfig(max_steps=7), 10) == 7


def test_fedprox_term_keeps_the_adapter_near_its_start(tokenizer) -> None:
    cfg = TrainConfig(max_steps=6, batch_size=4, lr=1e-2)

    def moved(mu: float) -> float:
        model = _fresh()
        start = adapter_state(model)
        train(model, _data(), tokenizer, cfg, seed=1, proximal_mu=mu)
        end = adapter_state(model)
        return float(sum(((end[k] - start[k]) ** 2).sum() for k in start) ** 0.5)

    assert moved(100.0) < 0.8 * moved(0.0)


def test_gradient_correction_shifts_an_sgd_step_by_lr_times_correction(tokenizer) -> None:
    from fedtune.models.adapters import parameter_names

    cfg = TrainConfig(max_steps=1, batch_size=4, lr=0.1, optimizer="sgd", max_grad_norm=None)
    plain, shifted = _fresh(), _fresh()
    start = adapter_state(plain)
    key = next(k for k in start if "lora_B" in k)
    correction = {parameter_names(start)[key]: torch.full_like(start[key], 0.5)}
    train(plain, _data(), tokenizer, cfg, seed=1)
    train(shifted, _data(), tokenizer, cfg, seed=1, correction=correction)
    diff = adapter_state(shifted)[key] - adapter_state(plain)[key]
    torch.testing.assert_close(diff, torch.full_like(diff, -0.1 * 0.5))  # one step: -lr * correction
