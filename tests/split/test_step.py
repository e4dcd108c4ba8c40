"""One split step against the unsplit peft model: same loss, same gradient for every LoRA weight."""

from __future__ import annotations

import pytest
import torch

from fedtune.split import cut_model, split_step

CASES = [("llama", 2, 2), ("llama", 1, 4), ("qwen2", 1, 1), ("gpt2", 1, 2)]


@pytest.mark.parametrize(("kind", "n_head", "n_tail"), CASES)
def test_split_step_matches_unsplit_loss_and_adapter_grads(lora_pair, batch, kind, n_head, n_tail):
    # Prepare
    reference, to_cut = lora_pair(kind)
    head, trunk, tail = cut_model(to_cut, n_head, n_tail)
    # Execute
    out = reference(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    )
    out.loss.backward()
    result = split_step(head, trunk, tail, batch)
    # Assert
    assert result.loss == pytest.approx(float(out.loss.detach()), abs=1e-5)
    assert result.num_tokens == int((batch["labels"][:, 1:] != -100).sum())
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    cut_params = dict(to_cut.named_parameters())
    assert ref_grads and all("lora_" in n for n in ref_grads)
    for name, ref_grad in ref_grads.items():
        assert ref_grad is not None and ref_grad.abs().sum() > 0, name  # the check has teeth
        split_grad = cut_params[name].grad
        assert split_grad is not None, name
        torch.testing.assert_close(split_grad, ref_grad, atol=1e-5, rtol=0, msg=name)
    # every LoRA parameter belongs to exactly one part
    owned = [id(p) for part in (head, trunk, tail) for n, p in part.named_parameters() if "lora_" in n]
    assert sorted(owned) == sorted(id(cut_params[n]) for n in ref_grads)


def test_split_step_accepts_counts_instead_of_mask(lora_pair, batch):
    # Prepare
    _, to_cut = lora_pair("llama")
    parts = cut_model(to_cut, 2, 2)
    with_mask = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
    with_counts = {k: batch[k] for k in ("input_ids", "labels", "valid")}
    # Execute
    loss_mask = split_step(*parts, with_mask).loss
    loss_counts = split_step(*parts, with_counts).loss
    # Assert
    assert loss_mask == loss_counts
