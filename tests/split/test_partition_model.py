"""Cutting: bad cut sizes, adapter state dicts per side, and what crosses a cut."""

from __future__ import annotations

import re

import pytest
import torch
from peft import get_peft_model_state_dict
from transformers import OPTConfig, OPTForCausalLM

from fedtune.errors import FedtuneError
from fedtune.split import client_adapter_state_dict, cut_model, split_step, valid_counts


@pytest.mark.parametrize(
    ("n_head", "n_tail", "key"),
    [(0, 2, "split.n_head"), (6, 1, "split.n_head"), (2, 0, "split.n_tail"), (1, 6, "split.n_tail"),
     (True, 2, "split.n_head"), (2, 2.0, "split.n_tail"), (3, 3, "split.n_head + split.n_tail"),
     (5, 1, "split.n_head + split.n_tail")],
)  # fmt: skip
def test_bad_cut_sizes_name_the_key(lora_pair, n_head, n_tail, key):
    _, model = lora_pair("llama")  # 6 layers
    with pytest.raises(FedtuneError, match="^" + re.escape(key) + ":"):
        cut_model(model, n_head, n_tail)


def test_unsupported_architecture_is_named():
    opt = OPTForCausalLM(OPTConfig(vocab_size=32, hidden_size=16, num_hidden_layers=4, ffn_dim=32,
                                   num_attention_heads=2, word_embed_proj_dim=16))  # fmt: skip
    with pytest.raises(FedtuneError, match=r"model\.name: .*'opt'"):
        cut_model(opt, 1, 1)


def test_parts_hold_the_right_blocks(lora_pair):
    _, model = lora_pair("llama")
    head, trunk, tail = cut_model(model, 1, 2)
    assert (head.layer_range, trunk.layer_range, tail.layer_range) == (range(0, 1), range(1, 4), range(4, 6))
    assert trunk.blocks[0] is model.get_base_model().model.layers[1]  # shared, not copied


def test_adapter_state_dicts_partition_peft_state_dict(lora_pair):
    # Prepare
    _, model = lora_pair("llama")
    head, trunk, tail = cut_model(model, 2, 1)
    whole = get_peft_model_state_dict(model)
    # Execute
    head_sd, trunk_sd, tail_sd = (
        head.adapter_state_dict(),
        trunk.adapter_state_dict(),
        tail.adapter_state_dict(),
    )
    client_sd = client_adapter_state_dict(head, tail)
    # Assert: disjoint, together the whole adapter, under peft's names
    assert len(head_sd) + len(trunk_sd) + len(tail_sd) == len(whole)
    assert {**head_sd, **trunk_sd, **tail_sd}.keys() == whole.keys()
    assert client_sd.keys() == head_sd.keys() | tail_sd.keys()
    assert all(".layers.2." in k or ".layers.3." in k or ".layers.4." in k for k in trunk_sd)
    assert all(".layers.0." in k or ".layers.1." in k for k in head_sd)
    for key, value in {**head_sd, **trunk_sd, **tail_sd}.items():
        assert torch.equal(value, whole[key])


def test_load_adapter_state_dict_round_trips(lora_pair):
    # Prepare
    _, model = lora_pair("gpt2")
    _, trunk, _ = cut_model(model, 1, 1)
    saved = trunk.adapter_state_dict()
    zeros = {k: torch.zeros_like(v) for k, v in saved.items()}
    # Execute
    trunk.load_adapter_state_dict(zeros)
    after_zero = trunk.adapter_state_dict()
    trunk.load_adapter_state_dict({**saved, "unrelated.lora_A.weight": torch.ones(1)})
    # Assert
    assert all(v.abs().sum() == 0 for v in after_zero.values())
    assert all(torch.equal(v, saved[k]) for k, v in trunk.adapter_state_dict().items())
    with pytest.raises(FedtuneError, match="lacks"):
        trunk.load_adapter_state_dict({})


def test_only_hidden_states_and_counts_cross_the_cuts(lora_pair, batch):
    # Prepare
    _, model = lora_pair("llama")
    parts = cut_model(model, 2, 2)
    # Execute
    crossings = split_step(*parts, batch).crossings
    # Assert
    assert [c.route for c in crossings] == ["head->trunk", "trunk->tail", "tail->trunk", "trunk->head"]
    for crossing in crossings[:2]:
        assert crossing.tensors.keys() == {"hidden", "valid"}
        hidden, valid = crossing.tensors["hidden"], crossing.tensors["valid"]
        assert hidden.dtype == torch.float32 and hidden.shape == (3, 10, 64)
        assert valid.dtype == torch.int64 and valid.tolist() == [10, 7, 4]
    for crossing in crossings[2:]:
        assert crossing.tensors.keys() == {"grad"}
        grad = crossing.tensors["grad"]
        assert grad.dtype == torch.float32 and grad.shape == (3, 10, 64)
        assert grad.grad_fn is None  # a plain tensor, no graph back into the sender
    # Nothing but the counts is integer, and no crossing tensor is token-shaped (B, T).
    tensors = [t for c in crossings for t in c.tensors.values()]
    assert all(t.is_floating_point() for t in tensors if t.ndim != 1)
    assert not any(t.shape == batch["input_ids"].shape for t in tensors)


@pytest.mark.parametrize(
    ("hidden", "valid", "match"),
    [(torch.zeros(2, 5, 64, dtype=torch.long), torch.tensor([5, 5]), "float"),
     (torch.zeros(2, 5), torch.tensor([5, 5]), "float"),
     (torch.zeros(2, 5, 32), torch.tensor([5, 5]), "hidden size 32"),
     (torch.zeros(2, 5, 64), torch.tensor([5.0, 5.0]), "int32/int64"),
     (torch.zeros(2, 5, 64), torch.tensor([5, 5, 5]), "shape"),
     (torch.zeros(2, 5, 64), torch.tensor([6, 5]), "1..5"),
     (torch.zeros(2, 5, 64), torch.tensor([0, 5]), "1..5")],
)  # fmt: skip
def test_trunk_rejects_malformed_activations(lora_pair, hidden, valid, match):
    _, model = lora_pair("llama")
    _, trunk, _ = cut_model(model, 2, 2)
    with pytest.raises(ValueError, match=match):
        trunk(hidden, valid)


def test_valid_counts_of_right_padded_mask():
    assert valid_counts(torch.tensor([[1, 1, 1], [1, 0, 0]])).tolist() == [3, 1]
    with pytest.raises(ValueError, match="right-padded"):
        valid_counts(torch.tensor([[0, 1, 1]]))
