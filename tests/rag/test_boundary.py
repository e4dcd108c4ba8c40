"""The knowledge boundary by forced choice: answer log-probs, decline margins, accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune.config import ModelConfig
from fedtune.data.tokenize import encode
from fedtune.data.types import message
from fedtune.models.load import load_tokenizer
from fedtune.rag.boundary import answer_logprob, boundary_accuracy, decline_margin, declined_share

CONV = [message("user", "What is a cat?"), message("assistant", "A cat is a small feline.")]
LIMITS = {"max_source_length": 64, "max_target_length": 32}
BOOST = 10.0  # the fake model's logit for EOS at every position


class EosLover(torch.nn.Module):
    """Logits BOOST for EOS and 0 for every other token, at every position."""

    def __init__(self, vocab: int, eos: int) -> None:
        super().__init__()
        self.vocab, self.eos = vocab, eos
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> object:
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.eos] = BOOST

        class Out:
            pass

        out = Out()
        out.logits = logits  # type: ignore[attr-defined]
        return out


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name="tiny-llama"))


def expected_mean(tokenizer, answer: str) -> float:
    """By hand: n answer tokens at -log Z each, then EOS at BOOST - log Z, averaged over n + 1."""
    n, log_z = len(encode(tokenizer, answer)), math.log(math.exp(BOOST) + len(tokenizer) - 1)
    return (n * -log_z + (BOOST - log_z)) / (n + 1)


def test_answer_logprob_averages_over_the_answer_and_eos_only(tokenizer):
    model = EosLover(len(tokenizer), tokenizer.eos_token_id)
    got = answer_logprob(model, tokenizer, CONV, "chat", **LIMITS)
    # 7 answer tokens + EOS: a source token counted, or EOS left out, would change the mean
    assert len(encode(tokenizer, CONV[-1]["content"])) == 7
    assert got == pytest.approx(expected_mean(tokenizer, CONV[-1]["content"]), rel=1e-5)


def test_decline_margin_is_the_difference_of_the_two_means(tokenizer):
    model = EosLover(len(tokenizer), tokenizer.eos_token_id)
    decline = "No."  # fewer tokens: EOS weighs more in its mean, so it scores higher here
    got = decline_margin(model, tokenizer, CONV, decline, "chat", **LIMITS)
    want = expected_mean(tokenizer, decline) - expected_mean(tokenizer, CONV[-1]["content"])
    assert want > 0 and got == pytest.approx(want, rel=1e-5)


def test_boundary_accuracy_balances_the_two_right_choices():
    # held: 1 of 2 answers (margin <= 0); lacking: 2 of 3 decline (> 0): (1/2 + 2/3) / 2
    assert boundary_accuracy([-0.5, 0.1], [0.2, 0.5, 0.0]) == pytest.approx(7 / 12)
    assert boundary_accuracy([1.0, 2.0], [3.0]) == 0.5  # always declining is no boundary
    assert boundary_accuracy([-1.0], [-2.0]) == 0.5  # nor is never declining
    assert boundary_accuracy([0.0], [0.1]) == 1.0
    with pytest.raises(ValueError, match="both"):
        boundary_accuracy([], [0.1])


def test_declined_share_counts_positive_margins():
    assert declined_share([-1.0, 0.0, 0.5, 2.0]) == 0.5  # a margin of 0 is not a decline
    with pytest.raises(ValueError):
        declined_share([])
