"""LoRA targets per architecture: ``auto`` finds each attention block's projections, a bad list
is refused naming the model's linear layers, and one federated round adapts what was intended."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from peft import AutoPeftModelForCausalLM, PeftModel
from peft.tuners.lora import LoraLayer

from fedtune.config import LoraConfig, ModelConfig
from fedtune.errors import FedtuneError
from fedtune.export import export_run
from fedtune.federated.aggregation.fedavg import fedavg
from fedtune.models.adapters import (
    adapter_state,
    attach_lora,
    initial_adapter_state,
    load_adapter_state,
    save_adapter_folder,
)
from fedtune.models.load import load_model
from fedtune.models.targets import resolve_targets, short_name, targeted_from_keys
from helpers import finished_tiny_run

VOCAB = 128
SMALL = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
DECODER_KV = {**DECODER, "num_key_value_heads": 2, "head_dim": 8}

# architecture -> (transformers config, the projections `auto` must adapt: each attention block's)
ARCHITECTURES = {
    "llama": (
        transformers.LlamaConfig(**DECODER_KV, **SMALL),
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    ),
    "qwen2": (
        transformers.Qwen2Config(**DECODER_KV, **SMALL),
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    ),
    "gemma": (
        transformers.GemmaConfig(**DECODER_KV, **SMALL),
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    ),
    "mistral": (
        transformers.MistralConfig(**DECODER_KV, **SMALL),
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    ),
    "phi3": (  # one fused q/k/v projection
        transformers.Phi3Config(**DECODER_KV, **SMALL),
        ["self_attn.qkv_proj", "self_attn.o_proj"],
    ),
    "opt": (
        transformers.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            **SMALL,
        ),
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"],
    ),
    "gpt2": (  # Conv1D layers; the MLP's c_proj must stay without LoRA
        transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **SMALL),
        ["attn.c_attn", "attn.c_proj"],
    ),
    "gpt_neox": (
        transformers.GPTNeoXConfig(**DECODER, **SMALL),
        ["attention.query_key_value", "attention.dense"],
    ),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each architecture as a tiny random model saved in a local folder (``model.name`` takes a path)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch, (config, _) in ARCHITECTURES.items():
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def adapted(model: torch.nn.Module) -> set[str]:
    return {short_name(n) for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def local_steps(model: PeftModel, seed: int, steps: int = 2) -> None:
    """A client's local training: a few AdamW steps on random token sequences."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, VOCAB, (2, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_one_round_adapts_every_attention_projection(
    arch: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    cfg = ModelConfig(name=str(model_dirs[arch]), lora=LoraConfig(r=2, alpha=4, dropout=0.0))
    intended = set(ARCHITECTURES[arch][1])
    start = initial_adapter_state(cfg, seed=0)  # the server's round-0 adapter, built on meta
    # 2 layers x each projection x (A, B)
    assert len(start) == 2 * len(intended) * 2
    assert set(targeted_from_keys(start)) == intended
    replies = []
    for client in range(2):
        model = attach_lora(load_model(cfg), cfg.lora, seed=0)
        assert adapted(model) == intended
        load_adapter_state(model, start)
        local_steps(model, seed=client)
        replies.append({k: v.numpy() for k, v in adapter_state(model).items()})
    merged = fedavg(replies, [1.0, 1.0])
    assert any(not np.allclose(merged[k], start[k].numpy()) for k in merged if ".lora_B." in k)
    folder = save_adapter_folder({k: torch.from_numpy(v) for k, v in merged.items()}, cfg.lora, cfg, tmp_path)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(intended)
    assert saved["fan_in_fan_out"] is (arch == "gpt2")  # Conv1D weights are stored (in, out)
    reloaded = PeftModel.from_pretrained(load_model(cfg), str(folder))
    assert adapted(reloaded) == intended


@torch.no_grad()
def test_an_exported_gpt2_adapter_reloads_in_plain_peft_to_the_same_outputs(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    # Prepare: a finished run on GPT-2 (its adapter's B = 0.05), and fedtune's own model with it
    run, cfg = finished_tiny_run(tmp_path / "runs", f"model.name='{model_dirs['gpt2']}'")
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    model = attach_lora(load_model(cfg.model), cfg.model.lora)
    load_adapter_state(model, run.load_round(1))
    expected = model(input_ids=ids).logits
    base = load_model(cfg.model)(input_ids=ids).logits
    # Execute
    out = export_run(run.path, tmp_path / "out")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    got = reloaded(input_ids=ids).logits
    # Assert: the config says what was trained, so peft has nothing to correct
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is True
    assert sorted(saved["target_modules"]) == ["attn.c_attn", "attn.c_proj"]
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, base)


def test_a_name_that_matches_nothing_names_the_linear_layers(model_dirs: dict[str, Path]) -> None:
    cfg = ModelConfig(name=str(model_dirs["gpt2"]), lora=LoraConfig(target_modules=("q_proj", "v_proj")))
    with pytest.raises(
        FedtuneError, match=r"model\.lora\.target_modules: 'q_proj' matches no module.*attn\.c_attn"
    ):
        initial_adapter_state(cfg, seed=0)


def test_a_target_that_is_not_linear_is_refused(model_dirs: dict[str, Path]) -> None:
    model = load_model(ModelConfig(name=str(model_dirs["llama"])))
    with pytest.raises(
        FedtuneError, match=r"model\.lora\.target_modules: 'self_attn' is a LlamaAttention, not a linear"
    ):
        resolve_targets(model, ["self_attn"])


def test_all_linear_is_passed_to_peft_and_adds_the_mlps(model_dirs: dict[str, Path]) -> None:
    cfg = ModelConfig(name=str(model_dirs["phi3"]), lora=LoraConfig(r=2, target_modules="all-linear"))
    model = attach_lora(load_model(cfg), cfg.lora)
    assert adapted(model) == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}


def test_short_name_drops_the_layer_index() -> None:
    assert short_name("model.layers.13.self_attn.q_proj") == "self_attn.q_proj"
    assert short_name("lm_head") == "lm_head"
    assert targeted_from_keys(
        [
            "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
            "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight",
        ]
    ) == ["attn.c_attn"]
