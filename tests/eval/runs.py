"""A tiny-llama run directory with a non-zero adapter (its own module: tests import it by name)."""

from __future__ import annotations

from pathlib import Path

import torch

from fedtune.config import load_config
from fedtune.models.adapters import initial_adapter_state
from fedtune.rundir import RunDir


def make_run(tmp_path: Path, *overrides: str, config: str = "configs/tiny.toml") -> RunDir:
    cfg = load_config(config, [f"run.output_dir='{tmp_path}'", *overrides])
    run = RunDir.create(cfg)
    state = initial_adapter_state(cfg.model, seed=0)
    state = {k: v if "lora_A" in k else torch.full_like(v, 0.05) for k, v in state.items()}  # non-zero B
    run.save_round(1, state, cfg)
    run.mark_complete(1)
    run.save_final(state, cfg)
    return run
