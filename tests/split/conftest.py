"""Tiny random decoders wrapped with LoRA, built from config (no files), for the split tests."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lora_model(kind: str, seed: int = 0) -> PeftModel:
    """A seeded tiny model of ``kind`` (llama: 6 layers, gpt2 / qwen2: 4) with random LoRA A and B."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
        model, targets = LlamaForCausalLM(config), LLAMA_TARGETS
    elif kind == "qwen2":
        config = Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
        model, targets = Qwen2ForCausalLM(config), LLAMA_TARGETS
    elif kind == "gpt2":
        # dropout off: the parity tests compare two forward passes
        config = GPT2Config(
            vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=4, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model, targets = GPT2LMHeadModel(config), ["c_attn", "c_proj", "c_fc"]
    else:
        raise ValueError(kind)
    # init_lora_weights=False draws B at random too: with B = 0 every lora_A gradient would be 0
    # and the gradient comparison would prove nothing for half the adapter.
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's Conv1D: peft warns and sets fan_in_fan_out itself
        peft_model = get_peft_model(model, lora)
    peft_model.eval()
    return peft_model  # type: ignore[return-value]


@pytest.fixture
def lora_pair() -> Callable[[str], tuple[PeftModel, PeftModel]]:
    """(unsplit reference, identical copy to cut) for a model kind."""

    def make(kind: str) -> tuple[PeftModel, PeftModel]:
        reference = tiny_lora_model(kind)
        return reference, copy.deepcopy(reference)

    return make


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Three right-padded samples of 10, 7 and 4 tokens; prompt tokens and padding labelled -100."""
    gen = torch.Generator().manual_seed(1)
    valid = torch.tensor([10, 7, 4])
    input_ids = torch.randint(3, VOCAB, (3, 10), generator=gen)
    attention_mask = (torch.arange(10).unsqueeze(0) < valid.unsqueeze(1)).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :4] = -100  # a prompt whose tokens are not trained on
    labels[1, :2] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "valid": valid}
