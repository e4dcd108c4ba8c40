"""`fedtune run`'s shell around the simulation: what a failed federation leaves behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune import launch
from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.federated import simulation
from fedtune.rundir import RunDir


def _failing(last_round: int):  # type: ignore[no-untyped-def]
    """A simulation whose federation fails after ``last_round`` (-1: before round 0)."""

    def simulate(cfg, run: RunDir, *, progress: bool = True) -> None:  # type: ignore[no-untyped-def]
        if last_round >= 0:
            run.mark_complete(last_round)
        run.mark_failed("2 of 3 clients started, fewer than the 3 needed")

    return simulate


def test_a_federation_that_never_started_leaves_no_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(simulation, "simulate", _failing(-1))
    cfg = load_config("configs/tiny.toml", [f"run.output_dir='{tmp_path / 'runs'}'"])
    with pytest.raises(FedtuneError, match=r"^the federation did not start: 2 of 3 clients started"):
        launch.run(cfg, progress=False)
    assert not any((tmp_path / "runs").iterdir())


def test_a_federation_that_failed_after_a_round_is_kept_for_a_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(simulation, "simulate", _failing(1))
    cfg = load_config("configs/tiny.toml", [f"run.output_dir='{tmp_path / 'runs'}'"])
    with pytest.raises(FedtuneError, match=r"run FAILED after round 1 of 2: .* fedtune run --resume "):
        launch.run(cfg, progress=False)
    (run,) = (tmp_path / "runs").iterdir()
    assert RunDir(run).failed() is not None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.lora.target_modules=['mlp']",
            r"model\.lora\.target_modules: 'mlp' is a LlamaMLP, not a linear",
        ),
        ("model.lora.target_modules=['c_attn']", r"model\.lora\.target_modules: 'c_attn' matches no module"),
        ("model.device='cuda:7'", r"model\.device='cuda:7': this machine has \d CUDA"),
    ],
)
def test_a_model_the_run_cannot_use_is_refused_before_a_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, override: str, message: str
) -> None:
    monkeypatch.setattr(simulation, "simulate", _failing(-1))
    out = tmp_path / "runs"
    cfg = load_config(
        "configs/tiny.toml", [f"run.output_dir='{out}'", "model.quantization={bits=4}", override]
    )
    with pytest.raises(FedtuneError, match=message):
        launch.run(cfg, progress=False)
    assert not out.exists() or not any(out.iterdir())
