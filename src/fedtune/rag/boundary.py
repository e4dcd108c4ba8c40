"""The knowledge boundary, measured by forced choice.

Does the model prefer to decline when the evidence lacks the answer, and to answer when it
holds it? For one prompt, the **decline margin** is the mean log-probability per token of
``rag.decline_text`` as the answer minus that of the gold answer: the model, forced to choose
between the two, declines when it is > 0. Asked each question twice, with evidence that holds
its answer and with evidence that lacks it, a model that knows the boundary answers the first
and declines the second; :func:`boundary_accuracy` is the balanced share of right choices
(0.5: no boundary, as a model that always or never declines). Unlike counting declines in
greedy answers, every question counts, with two forward passes and no sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.data.templates import Template
from fedtune.data.tokenize import IGNORE_INDEX, tokenize_conversation
from fedtune.data.types import Conversation, message
from fedtune.training.local import label_logprobs


def answer_logprob(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conv: Conversation,
    template: Template | str,
    *,
    max_source_length: int,
    max_target_length: int,
) -> float:
    """Mean log-probability per token of ``conv``'s last assistant turn (EOS included) given the rest."""
    row = tokenize_conversation(
        conv, tokenizer, template, max_source_length=max_source_length, max_target_length=max_target_length
    )
    labels = row["labels"]
    start = len(labels)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:  # the trailing labelled run: the last answer
        start -= 1
    row["labels"] = [IGNORE_INDEX] * start + labels[start:]
    model.eval()
    (mean,) = label_logprobs(model, [row], tokenizer.pad_token_id or 0)
    return mean


def decline_margin(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conv: Conversation,
    decline_text: str,
    template: Template | str,
    *,
    max_source_length: int,
    max_target_length: int,
) -> float:
    """How much more the model prefers ``decline_text`` than ``conv``'s own answer (mean log-prob)."""
    limits = {"max_source_length": max_source_length, "max_target_length": max_target_length}
    declined = [*conv[:-1], message("assistant", decline_text)]
    return answer_logprob(model, tokenizer, declined, template, **limits) - answer_logprob(
        model, tokenizer, conv, template, **limits
    )


def boundary_accuracy(held: Sequence[float], lacking: Sequence[float]) -> float:
    """The mean of the share of ``held`` margins that answer (<= 0) and of ``lacking`` ones that decline."""
    if not held or not lacking:
        raise ValueError("boundary_accuracy needs margins of both held and lacking prompts")
    return (1 - declined_share(held) + declined_share(lacking)) / 2


def declined_share(margins: Sequence[float]) -> float:
    """The share of prompts whose forced choice is the decline (margin > 0)."""
    if not margins:
        raise ValueError("declined_share needs at least one margin")
    return sum(m > 0 for m in margins) / len(margins)
