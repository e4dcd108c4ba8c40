"""Shared test set-up: offline, quiet, a private fedtune cache only if asked."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import pytest

from fedtune.config import Config, load_config


@pytest.fixture
def tiny_config(tmp_path) -> Config:
    """configs/tiny.toml writing into tmp_path."""
    return load_config("configs/tiny.toml", [f"run.output_dir='{tmp_path / 'runs'}'"])
