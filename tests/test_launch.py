"""`fedtune run`'s shell around the simulation: what a failed federation leaves behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune import launch
from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.federated import simulation
from fedtune.rundir import RunDir
from helpers import run_cli


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


def _started_quantised(tmp_path: Path) -> RunDir:
    """A 4-bit run that failed after round 1 (so a resume would continue it)."""
    cfg = load_config(
        "configs/tiny.toml", [f"run.output_dir='{tmp_path / 'runs'}'", "model.quantization={bits=4}"]
    )
    run = RunDir.create(cfg)
    run.mark_complete(1)
    return run


def test_a_resume_on_another_quantisation_is_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the run's config.toml edited by hand from 4 to 8 bits
    run = _started_quantised(tmp_path)
    edited = load_config(run.config_file, ["model.quantization={bits=8}"])
    run.config_file.write_text(edited.to_toml(), encoding="utf-8")
    monkeypatch.setattr(simulation, "simulate", _failing(5))  # must never be reached
    # Execute / Assert
    with pytest.raises(
        FedtuneError, match=r"^model\.quantization: .*config\.toml has \{'bits': 8.*started with \{'bits': 4"
    ):
        launch.run(resume=run.path, progress=False)
    assert run.last_round() == 1 and run.failed() is None


def test_a_resume_on_the_runs_own_quantisation_goes_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _started_quantised(tmp_path)
    monkeypatch.setattr(simulation, "simulate", _failing(1))
    with pytest.raises(FedtuneError, match="run FAILED after round 1"):  # it reached the federation
        launch.run(resume=run.path, progress=False)


def test_resume_with_a_quantisation_set_names_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = _started_quantised(tmp_path)
    code, _, err = run_cli(capsys, "run", "--resume", str(run.path), "--set", "model.quantization={bits=8}")
    assert code == 2 and "drop --set model.quantization" in err and "Traceback" not in err


def test_a_quantisation_without_its_backend_is_refused_before_a_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedtune.models import quantize

    real = quantize.importlib.util.find_spec
    monkeypatch.setattr(
        quantize.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name)
    )
    monkeypatch.setattr(simulation, "simulate", _failing(-1))
    out = tmp_path / "runs"
    cfg = load_config("configs/tiny.toml", [f"run.output_dir='{out}'", "model.quantization={bits=8}"])
    with pytest.raises(FedtuneError, match=r"^model\.quantization: needs bitsandbytes"):
        launch.run(cfg, progress=False)
    assert not out.exists()


def test_a_device_map_with_split_learning_is_refused_before_a_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    cfg = load_config(
        "configs/tiny.toml", [f"run.output_dir='{out}'", "model.device_map='auto'", "split.enabled=true"]
    )
    with pytest.raises(FedtuneError, match=r"^model\.device_map: not with split\.enabled"):
        launch.run(cfg, progress=False)
    assert not out.exists()
