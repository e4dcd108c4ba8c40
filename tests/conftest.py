"""Shared test set-up: offline, quiet, a private fedtune cache only if asked."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import pytest
import torch

from fedtune.config import Config, load_config

# The test models are a few layers 8-64 wide: intra-op threads cost more in hand-offs than they
# bring, and on a busy 2-core machine they spin against other processes (the fast tier took 130 s
# with 2 threads, 61 s with 1). Runs started as subprocesses keep their own train.num_threads.
torch.set_num_threads(1)


@pytest.fixture
def tiny_config(tmp_path) -> Config:
    """configs/tiny.toml writing into tmp_path."""
    return load_config("configs/tiny.toml", [f"run.output_dir='{tmp_path / 'runs'}'"])
