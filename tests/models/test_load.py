from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedtune.config import LoraConfig, ModelConfig
from fedtune.errors import FedtuneError
from fedtune.models.adapters import (
    adapter_num_bytes,
    adapter_state,
    attach_lora,
    initial_adapter_state,
    load_adapter_state,
    read_adapter_folder,
    save_adapter_folder,
)
from fedtune.models.load import load_model, load_model_config, resolve_model_path

TINY = ModelConfig(
    name="tiny-llama", lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
)


def test_rope_scaling_is_set_from_one_key() -> None:
    cfg = ModelConfig.model_validate({**TINY.model_dump(), "rope_scaling": {"type": "linear", "factor": 4.0}})
    params = load_model_config(cfg).rope_parameters
    assert params["rope_type"] == "linear" and params["factor"] == 4.0
    model = load_model(cfg)
    assert model.config.rope_parameters["factor"] == 4.0
    # linear scaling divides the rotary frequencies by the factor
    plain = load_model(TINY)
    scaled_inv = model.model.rotary_emb.inv_freq
    torch.testing.assert_close(scaled_inv * 4.0, plain.model.rotary_emb.inv_freq)


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FedtuneError, match=r"model\.name: .*not a model folder"):
        resolve_model_path(str(tmp_path / "no-such-model"))


def test_initial_adapter_is_seeded_with_zero_b() -> None:
    a = initial_adapter_state(TINY, seed=0)
    b = initial_adapter_state(TINY, seed=0)
    c = initial_adapter_state(TINY, seed=1)
    # 2 layers x (q, v) x (A, B)
    assert len(a) == 8
    key_a = next(k for k in a if "lora_A" in k)
    assert a[key_a].shape == (4, 64)
    assert torch.equal(a[key_a], b[key_a]) and not torch.equal(a[key_a], c[key_a])
    assert all(float(v.abs().sum()) == 0.0 for k, v in a.items() if "lora_B" in k)
    # r * (in + out) per module: q is 64->64, v is 64->32 (2 kv heads x 16)
    assert adapter_num_bytes(a) == 4 * 2 * (4 * (64 + 64) + 4 * (64 + 32))


def test_adapter_folder_loads_with_peft(tmp_path: Path) -> None:
    model = attach_lora(load_model(TINY), TINY.lora, seed=0)
    state = {k: torch.randn_like(v) for k, v in adapter_state(model).items()}
    load_adapter_state(model, state)
    folder = save_adapter_folder(state, TINY.lora, TINY, tmp_path / "adapter")
    assert {p.name for p in folder.iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    loaded = PeftModel.from_pretrained(load_model(TINY), folder)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    back = read_adapter_folder(folder)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_adapter_shape_mismatch_is_refused() -> None:
    model = attach_lora(load_model(TINY), TINY.lora, seed=0)
    state = adapter_state(model)
    key = next(iter(state))
    state[key] = torch.zeros(1, 1)
    with pytest.raises(FedtuneError, match="shape"):
        load_adapter_state(model, state)
