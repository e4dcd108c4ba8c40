"""The run directory owns every path in it, including a client's own state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.config import Config, LoraConfig, ModelConfig, RunSection
from fedtune.errors import FedtuneError
from fedtune.federated import stack_cache
from fedtune.federated.personal import load_personal, save_personal, state_root
from fedtune.metrics import failure_line
from fedtune.rundir import (
    RunDir,
    client_state_root,
    personal_folder,
    personal_rounds,
    stack_file,
)

KEY_A = "base_model.model.layers.0.q_proj.lora_A.weight"
MODEL = ModelConfig(name="tiny-llama", lora=LoraConfig(r=2, alpha=4, target_modules=("q_proj",)))


def _state(value: float) -> dict[str, torch.Tensor]:
    return {
        KEY_A: torch.full((2, 4), value),
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.full((4, 2), value),
    }


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    cfg = Config(run=RunSection(output_dir=str(tmp_path), name="t"), model=MODEL)
    return RunDir.create(cfg)


def test_paths_of_a_run(run: RunDir) -> None:
    assert RunDir.open(run.path).config_file == run.path / "config.toml"
    assert run.metrics_file == run.path / "metrics.jsonl"
    assert run.round_dir(3) == run.path / "rounds" / "0003"
    assert run.report_page == run.path / "report" / "index.html"
    assert run.clients_dir == run.path / "clients"


def test_final_dir_falls_back_to_the_last_complete_round(run: RunDir) -> None:
    cfg = run.config()
    with pytest.raises(FedtuneError, match="no complete round yet"):
        run.final_dir()
    run.save_round(1, _state(1.0), cfg)
    run.mark_complete(1)
    assert run.final_dir() == run.round_dir(1)
    run.save_final(_state(2.0), cfg)
    assert run.final_dir() == run.path / "final"


def test_server_state_round_trips_and_leaves_no_temporaries(run: RunDir) -> None:
    moments = {"m": np.arange(3, dtype=np.float32)}
    folder = run.save_round(2, _state(1.0), run.config(), server_state=moments)
    np.testing.assert_array_equal(run.load_server_state(2)["m"], moments["m"])
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "server_state.safetensors",
    ]
    assert run.load_server_state(1) == {}


def test_append_metrics_takes_any_iterable_of_mappings(run: RunDir) -> None:
    run.append_metrics(iter([{"round": 1, "phase": "server"}]))
    run.append_metrics({"round": 2, "phase": "train", "client": c} for c in (0, 1))
    assert [r["round"] for r in run.metrics()] == [1, 2, 2]
    run.rollback_to(1)
    assert run.metrics() == [{"round": 1, "phase": "server"}]


def test_a_failed_run_keeps_its_cause_and_its_failure_lines_until_the_next_complete_round(
    run: RunDir,
) -> None:
    run.mark_complete(1)
    run.append_metrics([{"round": 2, "phase": "train", "client": 0}])
    run.append_metrics([failure_line(2, "train", 1001, 1, "no reply within fed.round_timeout=5s")])
    run.mark_failed("round 2: below the quorum")
    assert (run.last_round(), run.failed(), run.stopped()) == (1, "round 2: below the quorum", None)
    run.rollback_to(1)  # a resume: the half round goes, the failure it saw stays
    assert [(r["round"], r.get("event")) for r in run.metrics()] == [(2, "failure")]
    run.mark_complete(2)
    assert run.failed() is None


def test_client_state_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    # the node's own state dir wins; else the run dir when on this host; else the cache
    node = tmp_path / "node"  # a SuperNode's state-dir serves many runs: one folder each
    assert client_state_root(str(node), str(run_dir)) == node / "runs" / run_dir.name
    assert client_state_root(None, str(run_dir)) == run_dir / "clients"
    assert client_state_root(None, "/elsewhere/runs/r2") == tmp_path / "cache" / "clients" / "r2"
    assert client_state_root(None, "") == tmp_path / "cache" / "clients" / "unnamed-run"
    assert state_root(None, str(run_dir)) == run_dir / "clients"  # personal.py's name for it


def test_personal_adapters_pruned_to_the_last_two(run: RunDir) -> None:
    root = run.clients_dir
    for server_round in (1, 2, 3):
        save_personal(_state(float(server_round)), MODEL.lora, MODEL, root, 4, server_round)
    assert personal_rounds(root, 4) == [2, 3]
    assert personal_folder(root, 4, 3) == root / "4" / "personal-0003"
    assert run.latest_personal(4) == personal_folder(root, 4, 3)
    assert float(load_personal(root, 4, before_round=3)[KEY_A][0, 0]) == 2.0
    assert load_personal(root, 4, before_round=2) is None
    assert personal_rounds(root, 5) == []
    with pytest.raises(FedtuneError, match="no personal adapter of client 5"):
        run.latest_personal(5)


def test_stack_cache_lives_under_the_same_root(tmp_path: Path) -> None:
    assert stack_cache.cache_file(tmp_path, 2) == stack_file(tmp_path, 2)
    assert stack_file(tmp_path, 2) == tmp_path / "2" / "stack.safetensors"
    stack_cache.save(tmp_path, 2, _state(1.0))
    stack_cache.save(tmp_path, 2, _state(2.0))
    assert float(stack_cache.load(tmp_path, 2)[KEY_A][0, 0]) == 2.0
    assert [p.name for p in (tmp_path / "2").iterdir()] == ["stack.safetensors"]


def test_run_paths_need_neither_torch_nor_transformers() -> None:
    # the report command and a client's path look-ups import this module on their own
    code = "import sys, fedtune.rundir, fedtune.report; print({'torch', 'transformers'} & set(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "set()"


def test_a_run_without_base_json_resumes_with_its_config(run: RunDir) -> None:
    # runs made before base.json existed: nothing to compare, the config.toml is taken as is
    (run.path / "base.json").unlink()
    assert run.resume_config().model.quantization is None
