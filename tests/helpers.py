"""Helpers shared by test modules (``pythonpath = ["tests"]`` in pyproject)."""

from __future__ import annotations

import sys
from unittest.mock import patch

import pytest

from fedtune.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``fedtune ARGS`` in-process: (exit code, stdout, stderr with whitespace folded)."""
    with patch.object(sys, "argv", ["fedtune", *args]):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())


def finished_tiny_run(tmp_path, *overrides: str, config: str = "configs/tiny.toml"):  # type: ignore[no-untyped-def]
    """A finished one-round run directory of ``config`` (tiny-llama) with a non-zero adapter.

    No training: the adapter is a fresh one with B set to 0.05, so it changes the logits.
    Returns ``(RunDir, Config)``.
    """
    import torch

    from fedtune.config import load_config
    from fedtune.models.adapters import initial_adapter_state
    from fedtune.rundir import RunDir

    cfg = load_config(config, [f"run.output_dir='{tmp_path}'", *overrides])
    run = RunDir.create(cfg)
    state = initial_adapter_state(cfg.model, seed=0)
    state = {k: v if "lora_A" in k else torch.full_like(v, 0.05) for k, v in state.items()}
    run.save_round(1, state, cfg)
    run.mark_complete(1)
    run.save_final(state, cfg)
    return run, cfg


def greedy_text(loaded, ids: list[int], max_new: int) -> str:  # type: ignore[no-untyped-def]
    """fedtune's own greedy continuation of ``ids`` by a loaded run (``inference.Loaded``), decoded
    as the server sends it (not stripped): what a served answer must equal."""
    import torch

    out = loaded.model.generate(
        input_ids=torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=0
    )
    return str(loaded.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
