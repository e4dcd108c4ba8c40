"""Quantised bases: LoRA trains on a 4/8-bit tiny Llama on the CPU, only the adapter changes,
and configs the device or backend cannot run are refused naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from pydantic import ValidationError
from safetensors.torch import load_file

from fedtune.config import LoraConfig, ModelConfig
from fedtune.errors import FedtuneError
from fedtune.models import quantize
from fedtune.models.adapters import adapter_state, attach_lora
from fedtune.models.load import load_model
from fedtune.models.targets import short_name

pytest.importorskip("bitsandbytes")


def quantised(**q: object) -> ModelConfig:
    return ModelConfig(name="tiny-llama", quantization=q, lora=LoraConfig(r=4, alpha=8, dropout=0.0))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, as float32 copies (4-bit weights as their packed bytes)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k: v.detach().float().clone() for k, v in tensors.items()}


@torch.no_grad()
def base_logits(model: PeftModel, ids: torch.Tensor) -> torch.Tensor:
    """The base model's logits, adapter off."""
    with model.disable_adapter():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(("q", "layer"), [({"bits": 4}, "Linear4bit"), ({"bits": 8}, "Linear8bitLt")])
def test_lora_trains_on_a_quantised_base_and_only_the_adapter_changes(
    q: dict[str, object], layer: str
) -> None:
    cfg = quantised(**q)
    model = attach_lora(load_model(cfg), cfg.lora, seed=0)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == layer
    probe = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(1))
    base_before, before = base_logits(model, probe), snapshot(model)
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(6):  # the same batch: the loss must fall as the adapter fits it
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = snapshot(model)
    # bitsandbytes' CPU kernel repacks a 4-bit weight on its first use (another shape, same
    # values): those are compared through the base model's outputs, the rest tensor by tensor
    changed = {
        k for k in before if before[k].shape == after[k].shape and not torch.equal(before[k], after[k])
    }
    assert changed and all(".lora_" in k for k in changed)
    torch.testing.assert_close(base_logits(model, probe), base_before, rtol=0, atol=1e-5)
    # the adapter exchanged is LoRA only, in fp32: 2 layers x q/k/v/o x (A, B)
    state = adapter_state(model)
    assert len(state) == 16 and all(".lora_" in k and v.dtype == torch.float32 for k, v in state.items())
    assert {short_name(k.split(".lora_")[0]) for k in state} == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    }


def test_an_evaluation_between_training_steps_leaves_the_4bit_base_as_it_was() -> None:
    # bitsandbytes repacks a 4-bit weight for its CPU inference kernel (AVX512-BF16 CPUs) on an
    # eval-mode, no-grad forward, and its training forward then misreads it: a model that
    # trains keeps the plain layout (models.quantize.keep_cpu_layout_for_training)
    cfg = quantised(bits=4)
    model = attach_lora(load_model(cfg), cfg.lora, seed=0)
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    weight = model.get_base_model().model.layers[0].mlp.down_proj.weight  # no LoRA on it
    plain = weight.data.clone()
    model.train()
    before = model(input_ids=ids, labels=ids).loss.item()
    model.eval()
    with torch.no_grad():  # what fedtune's held-out evaluation does
        model(input_ids=ids)
    model.train()
    assert torch.equal(weight.data, plain)
    assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(before, rel=1e-6)


def test_a_kind_that_is_not_of_its_bits_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"quantization\n.*kind 'nf4' is not a 8-bit"):
        quantised(bits=8, kind="nf4")
    assert quantised(bits=4).quantization.kind == "nf4"


def test_a_device_without_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FedtuneError, match=r"model\.device='cuda:1': this machine has 0 CUDA"):
        quantize.check_quantization(ModelConfig(name="tiny-llama", device="cuda:1"))
    assert quantize.resolve_device("auto") == torch.device("cpu")


def test_quantisation_without_its_backend_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = quantize.importlib.util.find_spec
    monkeypatch.setattr(
        quantize.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name)
    )
    with pytest.raises(FedtuneError, match=r"model\.quantization: needs bitsandbytes"):
        quantize.check_quantization(quantised(bits=4))


def test_a_device_bitsandbytes_cannot_use_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantize, "resolve_device", lambda name: torch.device("mps"))
    with pytest.raises(FedtuneError, match=r"model\.quantization: bitsandbytes cannot quantise on 'mps'"):
        quantize.check_quantization(quantised(bits=8))


@pytest.mark.integration  # `fedtune run` through Flower's simulation (Ray): ~30 s
def test_a_federated_run_on_a_4bit_base_sends_and_saves_lora_only(tmp_path: Path, capsys) -> None:
    from helpers import run_cli

    out = tmp_path / "runs"
    sets = [f"run.output_dir='{out}'", "model.quantization={bits=4}", "fed.rounds=1", "run.report=false"]
    cmd = ["run", "--config", "configs/tiny.toml", "--no-progress"]
    code, _, err = run_cli(capsys, *cmd, *(x for s in sets for x in ("--set", s)))
    assert code == 0, err[-3000:]
    (run,) = out.iterdir()
    final = load_file(run / "final" / "adapter_model.safetensors")
    # 2 layers x q/k/v/o x (A, B), all LoRA factors in fp32: nothing of the 4-bit base
    assert len(final) == 16 and all(".lora_" in k and v.dtype == torch.float32 for k, v in final.items())
    saved = json.loads((run / "final" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == [f"self_attn.{p}_proj" for p in "koqv"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["phase"] == "train" and r["round"] == 1 for r in metrics)


def mapped(path: Path) -> bool:
    """Whether this process still maps a file under ``path``."""
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("release", [True, False])
def test_a_quantised_load_does_not_keep_the_weight_file_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, release: bool
) -> None:
    # the unquantised tensors (embeddings, norms) would stay views of the memory-mapped fp32
    # file, and with them every page quantising read; the control run shows they do
    import shutil

    from fedtune.models.load import tiny_llama_dir

    folder = shutil.copytree(tiny_llama_dir(), tmp_path / "tiny")
    if not release:
        monkeypatch.setattr("fedtune.models.load.release_weight_file", lambda model: None)
    cfg = quantised(bits=4).model_copy(update={"name": str(folder)})
    model = load_model(cfg)
    reference = load_model(cfg.model_copy(update={"quantization": None, "name": str(tiny_llama_dir())}))
    assert mapped(folder) is not release
    embed = model.get_input_embeddings().weight
    assert torch.equal(embed, reference.get_input_embeddings().weight)
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is embed
