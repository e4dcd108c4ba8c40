"""fedtune export: the adapter and the merged model load in plain transformers / peft."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtune.errors import FedtuneError
from fedtune.export import export_run
from fedtune.inference import load_run
from fedtune.models.load import tiny_llama_dir
from helpers import finished_tiny_run, run_cli

IDS = [[1, 2, 3, 4]]
# runs in a fresh interpreter that never imports fedtune: what another tool would do
LOADER = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import AutoPeftModelForCausalLM
folder, kind, out = sys.argv[1:]
IDS = [[1, 2, 3, 4]]
cls = AutoPeftModelForCausalLM if kind == "adapter" else AutoModelForCausalLM
model = cls.from_pretrained(folder, dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(torch.tensor(IDS)).logits, out)
assert not any(name.startswith("fedtune") for name in sys.modules), "fedtune was imported"
"""


def _logits_outside(folder: Path, kind: str, tmp_path: Path) -> torch.Tensor:
    out = tmp_path / f"{kind}.pt"
    subprocess.run([sys.executable, "-c", LOADER, str(folder), kind, str(out)], check=True, cwd=tmp_path)
    return torch.load(out)


@pytest.mark.parametrize("merge", [False, True])
def test_export_loads_without_fedtune_and_matches(tmp_path: Path, merge: bool) -> None:
    # Prepare
    run, _ = finished_tiny_run(tmp_path / "runs", "model.rope_scaling={type='dynamic', factor=2.0}")
    with torch.no_grad():
        expected = load_run(run.path).model(torch.tensor(IDS)).logits
        base = load_run(run.path, base_only=True).model(torch.tensor(IDS)).logits
    # Execute
    out = export_run(run.path, tmp_path / "out", merge=merge)
    got = _logits_outside(out, "merged" if merge else "adapter", tmp_path)
    # Assert
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, base)  # the adapter is in
    if merge:
        config = json.loads((out / "config.json").read_text())
        rope = config["rope_parameters"]
        assert rope["rope_type"] == "dynamic" and rope["factor"] == 2.0
        assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()
    else:
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(tiny_llama_dir().resolve())


def test_export_refuses_an_existing_folder_unless_replace(tmp_path: Path) -> None:
    run, _ = finished_tiny_run(tmp_path / "runs")
    (tmp_path / "out").mkdir()
    with pytest.raises(FedtuneError, match="already exists"):
        export_run(run.path, tmp_path / "out")
    export_run(run.path, tmp_path / "out", replace=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_export_of_a_run_with_a_missing_adapter_file_names_it(capsys, tmp_path: Path) -> None:
    run, _ = finished_tiny_run(tmp_path / "runs")
    (run.path / "final" / "adapter_model.safetensors").unlink()
    code, _, err = run_cli(capsys, "export", str(run.path), str(tmp_path / "out"))
    assert code == 2 and "adapter_model.safetensors missing" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_export_of_a_folder_that_is_not_a_run(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "export", str(tmp_path), str(tmp_path / "out"))
    assert code == 2 and "Traceback" not in err


@torch.no_grad()
def test_merge_of_a_quantised_run_is_made_on_the_unquantised_base(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    # Prepare: a 4-bit run, and its adapter on the same base loaded without quantisation
    from fedtune.models.adapters import load_adapter_folder
    from fedtune.models.load import load_model

    run, cfg = finished_tiny_run(tmp_path / "runs", "model.quantization={bits=4}")
    full = cfg.model.model_copy(update={"quantization": None})
    expected = load_adapter_folder(load_model(full), run.final_dir())(torch.tensor(IDS)).logits
    # Execute
    out = export_run(run.path, tmp_path / "out", merge=True)
    got = _logits_outside(out, "merged", tmp_path)
    # Assert: a plain float32 checkpoint (no bitsandbytes config), the LoRA update merged in
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, load_model(full)(torch.tensor(IDS)).logits)


def test_loadable_base_is_a_hub_id_or_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedtune.export import loadable_base

    assert loadable_base("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert loadable_base("./my-model") == str(tmp_path / "my-model")  # relative: made absolute
    built = loadable_base("tiny-llama")  # fedtune's alias: the folder it was built into
    assert Path(built).is_absolute() and (Path(built) / "config.json").is_file()
