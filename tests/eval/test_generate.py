"""Left-padded batched generation answers as one prompt at a time does."""

from __future__ import annotations

import torch

from fedtune.eval.generate import Sampling, generate_batched, left_pad
from fedtune.inference import greedy, load_run
from fedtune.rundir import RunDir


def test_left_pad_aligns_right() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_greedy_equals_one_at_a_time(tiny_run: RunDir) -> None:
    loaded = load_run(tiny_run.path)
    prompts = [[1, 450, 4996, 17354, 1701], [1, 22172], [1, 3824, 526, 366]]
    batched = generate_batched(
        loaded.model, loaded.tokenizer, prompts, Sampling(max_new_tokens=6, batch_size=3)
    )
    single = [greedy(loaded.model, loaded.tokenizer, p, 6) for p in prompts]
    assert batched == single
    assert all(len(a) > 0 for a in batched)  # real continuations, not EOS at once


def test_sampling_is_seeded(tiny_run: RunDir) -> None:
    loaded = load_run(tiny_run.path)
    prompts = [[1, 450, 4996], [1, 22172]]
    s = Sampling(max_new_tokens=5, sample=True, temperature=1.5, seed=3)
    first = generate_batched(loaded.model, loaded.tokenizer, prompts, s)
    torch.manual_seed(99)
    assert generate_batched(loaded.model, loaded.tokenizer, prompts, s) == first
