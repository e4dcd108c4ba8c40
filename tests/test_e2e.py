"""`fedtune run` end to end through Flower's simulation runtime, and exact resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedtune import launch
from fedtune.config import load_config
from fedtune.inference import evaluate_clients, load_run
from fedtune.models.load import load_model

pytestmark = pytest.mark.integration  # every test runs `fedtune run` through Flower's simulation (Ray)


def fedtune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedtune", *args], capture_output=True, text=True, timeout=600, check=False
    )


def tiny_run(out: Path, *overrides: str) -> Path:
    """A run of configs/tiny.toml (3 clients x 2 rounds) with overrides; the run dir.

    What ``fedtune run`` does, in this process: a ``fedtune`` subprocess would spend ~10 s
    importing torch, transformers and Flower again before its run starts (the CLI itself is
    tested by ``finished_run``).
    """
    cfg = load_config("configs/tiny.toml", [f"run.output_dir='{out}'", *overrides])
    return launch.run(cfg, progress=False).path


def resume_after_round_1(run: Path, copy: Path, *, drop: tuple[str, ...] = ()) -> Path:
    """Copy ``run`` as a crash during round 2 leaves it (``drop`` lost too), then resume it."""
    shutil.copytree(run, copy)
    (copy / "state.json").write_text(json.dumps({"last_round": 1}))
    for sub in drop:
        shutil.rmtree(copy / sub)
    return launch.run(resume=copy, progress=False).path


def same_adapter(a: Path, b: Path) -> bool:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    proc = fedtune(
        "run", "--config", "configs/tiny.toml", "--set", f"run.output_dir='{out}'", "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out loss per client" in proc.stdout
    (run,) = out.iterdir()
    return run


def test_run_directory_is_complete(finished_run: Path) -> None:
    run = finished_run
    assert (run / "config.toml").is_file()
    assert json.loads((run / "state.json").read_text()) == {"last_round": 2}
    assert sorted(p.name for p in (run / "rounds").iterdir()) == ["0000", "0001", "0002"]
    assert (run / "report" / "index.html").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # 3 clients: round 0 evaluates; rounds 1-2 train and evaluate; one server line per round
    phases = [(r["round"], r["phase"]) for r in lines]
    assert phases.count((0, "evaluate")) == 3 and phases.count((0, "train")) == 0
    for rnd in (1, 2):
        assert phases.count((rnd, "train")) == 3 and phases.count((rnd, "evaluate")) == 3
    assert phases.count((1, "server")) == 1
    train = [r for r in lines if r["phase"] == "train"]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["seconds"] > 0 for r in train)
    assert all(r["num_examples"] == 16 for r in train)  # data.max_train_examples
    lr = load_config(run / "config.toml").train.lr
    assert all(r["lr"] == pytest.approx(lr) for r in train)  # fed.lr_schedule: constant


def test_lr_schedule_and_server_optimiser_state_survive_resume(tmp_path: Path) -> None:
    # one run for three (each costs a run and a resume): FedAdam's moments, the client lr schedule
    # and a crash that left round 2's remains but no final adapter
    run = tiny_run(
        tmp_path / "runs",
        "fed.lr_schedule='linear'",
        "train.lr=0.004",
        "fed.strategy='fedadam'",
        "fed.server_lr=0.01",
        "run.report=false",
    )
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["phase"] == "train"]
    assert sorted(r["round"] for r in train) == [1, 1, 1, 2, 2, 2]
    # linear over 2 rounds: round 1 at the full lr, round 2 at half
    assert all(r["lr"] == pytest.approx(0.004 if r["round"] == 1 else 0.002) for r in train)
    assert (run / "rounds" / "0001" / "server_state.safetensors").is_file()
    # the remains of round 2 (its adapter, metrics) are still on disk; final and report are not
    copy = resume_after_round_1(run, tmp_path / "interrupted", drop=("final",))
    assert same_adapter(run / "final", copy / "final")
    lines = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in lines if r["round"] == 2].count("train") == 3  # round 2 redone once


def test_final_adapter_is_a_peft_folder_equal_to_the_last_round(finished_run: Path) -> None:
    final = load_file(finished_run / "final" / "adapter_model.safetensors")
    last = load_file(finished_run / "rounds" / "0002" / "adapter_model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    first = load_file(finished_run / "rounds" / "0001" / "adapter_model.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in final)  # training moved it
    cfg = load_config(finished_run / "config.toml")
    model = PeftModel.from_pretrained(load_model(cfg.model), finished_run / "final")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_heterogeneous_ranks_stack_merge_end_to_end_and_resume(tmp_path: Path) -> None:
    run = tiny_run(
        tmp_path / "runs", "model.lora.ranks=[2, 4, 8]", "fed.strategy='stack'", "run.report=false"
    )
    config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2 * (2 + 4 + 8)  # cumulative stack of two rounds
    round1 = json.loads((run / "rounds" / "0001" / "adapter_config.json").read_text())
    assert round1["r"] == round1["lora_alpha"] == 2 + 4 + 8  # every round's folder is servable too
    PeftModel.from_pretrained(load_model(load_config(run / "config.toml").model), run / "rounds" / "0001")
    copy = resume_after_round_1(run, tmp_path / "interrupted")
    assert same_adapter(run / "final", copy / "final")
    cfg = load_config(run / "config.toml")
    PeftModel.from_pretrained(load_model(cfg.model), run / "final")  # servable as saved
    # round 2's messages carried only what clients lacked (their cached stack + the new ranks),
    # yet every client evaluated exactly the saved global
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    down = {x["round"]: x["bytes_down"] for x in lines if x["phase"] == "server"}
    assert down[2] < 1.2 * down[1]
    expected = evaluate_clients(load_run(run, adapter=run / "rounds" / "0002"))
    got = {x["client"]: x["eval_loss"] for x in lines if x["phase"] == "evaluate" and x["round"] == 2}
    assert got.keys() == expected.keys()
    assert all(abs(got[c] - expected[c]) < 1e-4 for c in got)  # fp16 wire vs fp32 folder


def test_fflora_keeps_personal_adapters_on_clients_and_resumes_exactly(tmp_path: Path) -> None:
    run = tiny_run(
        tmp_path / "runs",
        "fed.strategy='fflora'",
        "model.lora.personal_r=2",
        "run.report=false",
        "train.lr=0.01",
    )
    for pid in range(3):
        assert (run / "clients" / str(pid) / "personal-0002" / "adapter_model.safetensors").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in lines if r["phase"] == "evaluate" and r["round"] == 2]
    assert len(last) == 3 and all(
        {"eval_loss", "eval_loss_global", "eval_loss_personal"} <= r.keys() for r in last
    )
    # trained together, the fused model fits each client's own data better than the global part alone
    assert sum(r["eval_loss"] for r in last) < sum(r["eval_loss_global"] for r in last)
    # round 2's personal adapters are to be made again by the resumed run
    drop = tuple(f"clients/{pid}/personal-0002" for pid in range(3))
    copy = resume_after_round_1(run, tmp_path / "interrupted", drop=drop)
    assert same_adapter(run / "final", copy / "final")
    assert same_adapter(run / "clients/0/personal-0002", copy / "clients/0/personal-0002")
