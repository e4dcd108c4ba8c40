"""Batched generation: prompts left-padded into one batch, greedy or sampled.

A decoder-only model continues the last position of each row, so a batch pads on the left
(with an attention mask of zeros there) and every prompt ends at the same column; the new
tokens are what follows that column, cut at the first EOS.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.models.generation import input_device, left_pad, pad_id, stop_ids


@dataclass(frozen=True)
class Sampling:
    """How to generate: ``max_new_tokens``, and greedy (``sample=False``) or sampled with a seed."""

    max_new_tokens: int = 64
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    batch_size: int = 8


@torch.no_grad()
def generate_batched(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
) -> list[str]:
    """The decoded continuation of every prompt (token ids), ``sampling.batch_size`` at a time."""
    if sampling.sample:
        torch.manual_seed(sampling.seed)
    stops = stop_ids(model, tokenizer)
    pad = pad_id(tokenizer, stops)
    answers: list[str] = []
    for start in range(0, len(prompts), sampling.batch_size):
        ids, mask = (
            t.to(input_device(model)) for t in left_pad(prompts[start : start + sampling.batch_size], pad)
        )
        kw: dict[str, object] = {"do_sample": sampling.sample}
        if sampling.sample:
            kw.update(temperature=sampling.temperature, top_p=sampling.top_p)
        out = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=stops,
            **kw,
        )
        new = out[:, ids.shape[1] :]
        answers.extend(str(tokenizer.decode(row, skip_special_tokens=True)).strip() for row in new)
    return answers


def adapter_off(model: torch.nn.Module | None, off: bool) -> contextlib.AbstractContextManager[Any]:
    """The peft model's ``disable_adapter()`` context when ``off`` (the base), else a no-op."""
    if not off:
        return contextlib.nullcontext()
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise TypeError("the base variant needs a peft model (its adapter is switched off)")
    cm: contextlib.AbstractContextManager[Any] = disable()
    return cm
