"""Adapter folders: written atomically; a missing or corrupt one is a FedtuneError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fedtune.models.adapters as adapters
from fedtune.config import LoraConfig, ModelConfig
from fedtune.errors import FedtuneError
from fedtune.models.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    check_adapter_folder,
    load_adapter_folder,
    read_adapter_folder,
    save_adapter_folder,
)
from fedtune.models.load import load_model

TINY = ModelConfig(name="tiny-llama", lora=LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=("q_proj",)))
KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _state(value: float) -> dict[str, torch.Tensor]:
    return {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": torch.full(shape, value)
        for i in (0, 1)
        for ab, shape in (("A", (2, 64)), ("B", (64, 2)))
    }


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return save_adapter_folder(_state(1.0), TINY.lora, TINY, tmp_path / "final")


def test_crash_while_saving_keeps_the_old_folder(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the weights writer dies half-way
    def crash(state: object, path: object) -> None:
        Path(str(path)).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", crash)
    # Execute
    with pytest.raises(OSError, match="disk full"):
        save_adapter_folder(_state(2.0), TINY.lora, TINY, folder)
    # Assert
    assert float(read_adapter_folder(folder)[KEY_A][0, 0]) == 1.0
    assert [p.name for p in folder.parent.iterdir()] == ["final"]


def test_missing_weights_are_named(folder: Path) -> None:
    (folder / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(FedtuneError, match=rf"final: not a peft adapter folder \({ADAPTER_WEIGHTS} missing"):
        read_adapter_folder(folder)


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FedtuneError, match="nope: no such adapter folder"):
        check_adapter_folder(tmp_path / "nope")


@pytest.mark.parametrize("keep", [0, 5, 100])
def test_truncated_weights_are_named(folder: Path, keep: int) -> None:
    weights = folder / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(FedtuneError, match=rf"{ADAPTER_WEIGHTS}: corrupt or truncated adapter weights"):
        read_adapter_folder(folder)


def test_corrupt_config_is_named(folder: Path) -> None:
    (folder / ADAPTER_CONFIG).write_text('{"r": 2,')
    with pytest.raises(FedtuneError, match=rf"{ADAPTER_CONFIG}: corrupt adapter config"):
        check_adapter_folder(folder)


def test_load_adapter_folder_applies_it_and_refuses_a_misfit(folder: Path) -> None:
    peft_model = load_adapter_folder(load_model(TINY), folder)
    assert float(peft_model.get_parameter(KEY_A.replace(".weight", ".default.weight"))[0, 0]) == 1.0
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, "r": 3}))  # weights are rank 2
    with pytest.raises(FedtuneError, match="final: could not load the adapter"):
        load_adapter_folder(load_model(TINY), folder)
