"""A tiny run with nf4 on the wire, error feedback and DP-SGD on clients: it trains, fewer bytes cross
than in float16, and each client reports its ε."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedtune.config import load_config
from fedtune.federated.records import to_record
from fedtune.launch import run
from fedtune.models.adapters import initial_adapter_state

pytestmark = pytest.mark.integration


def _run(out: Path, *overrides: str) -> list[dict]:
    sets = [
        f"run.output_dir='{out}'",
        "run.report=false",
        "fed.rounds=2",
        "fed.evaluate_before=false",
        *overrides,
    ]
    return run(load_config("configs/tiny.toml", sets), progress=False).metrics()


def _mean(rows: list[dict], phase: str, key: str) -> float:
    return float(np.mean([r[key] for r in rows if r["phase"] == phase]))


def _fp16_adapter_bytes() -> int:
    """What the tiny run's adapter alone takes on the wire in float16 (the default wire dtype)."""
    cfg = load_config("configs/tiny.toml")
    state = {k: v.numpy() for k, v in initial_adapter_state(cfg.model, seed=cfg.seed).items()}
    return sum(len(a.data) for a in to_record(state, "float16").values())


def test_nf4_with_error_feedback_and_local_dp_trains_shrinks_the_bytes_and_reports_epsilon(
    tmp_path: Path,
) -> None:
    # Prepare / Execute: one run for two client-side options (each run costs ~30 s of start-up):
    # nf4 + error feedback, against the float16 encoding of its adapter, and DP-SGD on clients
    local_dp = ("privacy.local_dp.enabled=true", "privacy.local_dp.noise_multiplier=1.0")
    nf4 = _run(tmp_path / "nf4", "fed.wire_dtype='nf4'", "fed.error_feedback=true", *local_dp)
    fp16 = _fp16_adapter_bytes()
    # Assert: every client trained and evaluated in both rounds with finite losses
    train = [r for r in nf4 if r["phase"] == "train"]
    assert {r["round"] for r in train} == {1, 2} and len(train) == 6 and "rejected" not in str(train)
    assert all(math.isfinite(r["eval_loss"]) for r in nf4 if r["phase"] == "evaluate")
    # nf4 codes are 4 bits of float16's 16 (plus a scale per block): a whole reply, metrics and
    # all, is under half the float16 adapter alone; an instruction, config and all, under all of it
    assert _mean(nf4, "train", "bytes_up") < 0.5 * fp16
    assert _mean(nf4, "train", "bytes_down") < fp16
    # each client kept its rounding error under the run directory, one file per round
    (run_dir,) = (tmp_path / "nf4").iterdir()
    kept = sorted(
        p.relative_to(run_dir / "clients").as_posix() for p in (run_dir / "clients").rglob("residual-*")
    )
    assert kept == [f"{pid}/residual-000{r}.safetensors" for pid in range(3) for r in (1, 2)]
    # DP-SGD: each client's ε on every train line; the second round composes more steps
    by_client: dict[int, list[float]] = {}
    for r in train:
        by_client.setdefault(r["client"], []).append(r["local_epsilon"])
    assert sorted(by_client) == [0, 1, 2]
    for eps in by_client.values():
        assert len(eps) == 2 and 0 < eps[0] < eps[1]
    assert not (run_dir / "final" / "privacy.json").exists()  # no client-level DP in this run
