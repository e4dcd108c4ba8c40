"""``load_catalogue``: several runs on one base model, and the runs it refuses to serve together."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel

from fedtune.errors import FedtuneError
from fedtune.inference import load_run
from fedtune.models.adapters import initial_adapter_state
from fedtune.serve import Limits, build_app, load_catalogue
from helpers import finished_tiny_run, greedy_text


def _two_runs(tmp_path: Path) -> tuple[Path, Path]:
    """Two finished tiny runs whose final adapters differ (B = 0.05 and B = -0.1)."""
    first, _ = finished_tiny_run(tmp_path)  # one output folder: the second run's name gets a suffix
    second, cfg = finished_tiny_run(tmp_path)
    state = initial_adapter_state(cfg.model, seed=1)
    second.save_final({k: v if "lora_A" in k else torch.full_like(v, -0.1) for k, v in state.items()}, cfg)
    return first.path, second.path


def _alone(run_dir: Path, prompt: str, max_new: int) -> str:
    """The run's greedy completion, loaded by itself as ``fedtune chat`` would."""
    loaded = load_run(run_dir)
    return greedy_text(loaded, loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"], max_new)


def test_two_runs_share_one_base_and_each_answers_as_alone(tmp_path: Path) -> None:
    first, second = _two_runs(tmp_path)
    catalogue = load_catalogue([first, second])
    assert isinstance(catalogue.model, PeftModel)
    assert sorted(catalogue.model.peft_config) == ["r0", "r1"]  # one model, both adapters on it
    assert list(catalogue.served) == ["base", first.name, second.name]
    alone = {run.name: _alone(run, "The", 10) for run in (first, second)}
    assert alone[first.name] != alone[second.name]  # else the test could not tell them apart
    with TestClient(build_app([first, second], Limits(max_tokens=32, max_body_bytes=4096))) as client:
        for name in (first.name, second.name, first.name):  # alternate: each request its own adapter
            body = client.post("/v1/completions", json={"model": name, "prompt": "The", "max_tokens": 10})
            assert body.json()["choices"][0]["text"] == alone[name]


def test_runs_of_different_base_models_are_refused_naming_the_run(tmp_path: Path) -> None:
    first, _ = finished_tiny_run(tmp_path / "a")
    other, _ = finished_tiny_run(tmp_path / "b", "model.dtype='bfloat16'")
    with pytest.raises(FedtuneError, match=rf"{other.path}: its \[model\] differs from {first.path}"):
        load_catalogue([first.path, other.path])


@pytest.mark.parametrize("clash", ["same-name", "named-base"])
def test_run_folder_names_must_be_distinct_model_ids(tmp_path: Path, clash: str) -> None:
    run, _ = finished_tiny_run(tmp_path / "a")
    name = run.path.name if clash == "same-name" else "base"
    twin = shutil.copytree(run.path, tmp_path / "elsewhere" / name)
    runs = [run.path, twin] if clash == "same-name" else [twin]
    with pytest.raises(FedtuneError, match="model ids are the run folders' names"):
        load_catalogue(runs)
