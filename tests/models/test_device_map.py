"""``model.device_map``: accelerate places the model; checked before a run, trains on the CPU."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from fedtune.config import Config, LoraConfig, ModelConfig, config_from_toml_text
from fedtune.errors import FedtuneError
from fedtune.models import quantize
from fedtune.models.adapters import attach_lora
from fedtune.models.load import load_model


def _one_step_changes_only_the_adapter(cfg: ModelConfig) -> torch.nn.Module:
    model = attach_lora(load_model(cfg), cfg.lora, seed=0)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    changed = {
        n
        for n, p in model.named_parameters()
        if p.shape == before[n].shape and not torch.equal(p.float(), before[n])
    }
    assert torch.isfinite(loss) and changed and all(".lora_" in n for n in changed)
    return model


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}])
def test_a_device_map_on_the_cpu_loads_and_trains_a_step(device_map: str | dict[str, str]) -> None:
    cfg = ModelConfig(name="tiny-llama", device_map=device_map, lora=LoraConfig(r=2, alpha=4, dropout=0.0))
    assert quantize.load_kwargs(cfg) == {"device_map": device_map}  # handed to from_pretrained as is
    model = _one_step_changes_only_the_adapter(cfg)
    # with no GPU there is nothing to spread: everything lands on the CPU
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_a_device_map_with_a_quantised_base_trains_on_the_cpu() -> None:
    pytest.importorskip("bitsandbytes")
    cfg = ModelConfig(
        name="tiny-llama", device_map="auto", quantization={"bits": 4}, lora=LoraConfig(r=2, dropout=0.0)
    )
    extra = quantize.load_kwargs(cfg)  # the user's map, not model.device's
    assert extra["device_map"] == "auto" and extra["quantization_config"].load_in_4bit
    model = _one_step_changes_only_the_adapter(cfg)
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"device_map": "auto", "device": "cpu"}, r"set model\.device_map or model\.device='cpu', not both"),
        (
            {"device_map": {"model.layers": "disk"}},
            r"device_map: 'model\.layers' = 'disk': each module needs",
        ),
        ({"device_map": {}}, r"device_map: empty"),
        ({"device_map": "everywhere"}, r"device_map"),
    ],
)
def test_a_bad_device_map_is_refused_naming_it(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelConfig(name="tiny-llama", **settings)


def test_a_device_map_naming_a_missing_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for target in (1, "cuda:0"):
        cfg = ModelConfig(name="tiny-llama", device_map={"model.embed_tokens": "cpu", "model.layers": target})
        with pytest.raises(FedtuneError, match=rf"model\.device_map: {target!r}: this machine has 0 CUDA"):
            quantize.check_quantization(cfg)


def test_a_device_map_by_module_survives_the_run_directorys_config_toml() -> None:
    dm = {"model.embed_tokens": 0, "model.layers": "cuda:1", "lm_head": "cpu"}
    cfg = Config(model=ModelConfig(device_map=dm))
    assert config_from_toml_text(cfg.to_toml(), source="t").model.device_map == dm


def test_a_model_config_with_a_device_map_by_module_stays_hashable() -> None:
    # a client caches its loaded model keyed on model's config
    one, two = (ModelConfig(device_map={"model.layers": 1, "lm_head": "cpu"}) for _ in range(2))
    assert hash(one) == hash(two) and hash(Config(model=one)) == hash(Config(model=two))
    assert hash(one) != hash(ModelConfig(device_map={"model.layers": 0, "lm_head": "cpu"}))
