"""Greedy generation across the split, KV cache in every part, against the unsplit model's generate."""

from __future__ import annotations

import pytest
import torch

from fedtune.split import cut_model, split_generate

NEW_TOKENS = 8


def _reference_generate(model, prompt: torch.Tensor, eos: int | None) -> list[int]:
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    out = model.generate(
        input_ids=prompt.unsqueeze(0),
        attention_mask=torch.ones(1, prompt.shape[0], dtype=torch.long),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
    )
    return out[0, prompt.shape[0] :].tolist()


@pytest.mark.parametrize(("kind", "n_head", "n_tail"), [("llama", 2, 2), ("gpt2", 1, 2), ("qwen2", 1, 2)])
def test_greedy_split_generation_equals_unsplit(lora_pair, kind, n_head, n_tail):
    # Prepare
    reference, to_cut = lora_pair(kind)
    parts = cut_model(to_cut, n_head, n_tail)
    prompt = torch.tensor([5, 17, 99, 42, 7, 64])
    # Execute
    expected = _reference_generate(reference, prompt, eos=None)
    got = split_generate(*parts, prompt.unsqueeze(0), NEW_TOKENS, eos_token_id=None)
    # Assert
    assert len(expected) == NEW_TOKENS
    assert got == [expected]


def test_generation_stops_at_eos_like_generate(lora_pair):
    # Prepare: make the 4th greedy token the end token
    reference, to_cut = lora_pair("llama")
    parts = cut_model(to_cut, 2, 2)
    prompt = torch.tensor([5, 17, 99, 42, 7, 64])
    eos = _reference_generate(reference, prompt, eos=None)[3]
    # Execute
    expected = _reference_generate(reference, prompt, eos=eos)
    got = split_generate(*parts, prompt.unsqueeze(0), NEW_TOKENS, eos_token_id=eos)
    # Assert
    assert got == [expected]
    assert got[0][-1] == eos and len(got[0]) <= 4


def test_right_padded_batch_generates_each_sample_as_alone(lora_pair):
    # Prepare: a batch of 2 prompts of 6 and 3 tokens, right-padded to 6
    reference, to_cut = lora_pair("llama")
    parts = cut_model(to_cut, 2, 2)
    long, short = torch.tensor([5, 17, 99, 42, 7, 64]), torch.tensor([11, 3, 80])
    padded = torch.stack([long, torch.cat([short, torch.zeros(3, dtype=torch.long)])])
    # Execute
    got = split_generate(*parts, padded, NEW_TOKENS, valid=torch.tensor([6, 3]))
    # Assert
    assert got == [_reference_generate(reference, long, None), _reference_generate(reference, short, None)]


def test_decode_step_with_wrong_counts_is_rejected(lora_pair):
    # Prepare
    _, to_cut = lora_pair("llama")
    head, _, _ = cut_model(to_cut, 2, 2)
    cache = head.new_cache()
    head(torch.tensor([[5, 17, 99]]), torch.tensor([3]), cache=cache)
    # Execute / Assert: the next token is the 4th, not the 6th
    with pytest.raises(ValueError, match="do not continue"):
        head(torch.tensor([[8]]), torch.tensor([6]), cache=cache)
