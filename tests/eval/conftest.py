"""The tiny run directory fixture for eval and judge tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.runs import make_run
from fedtune.rundir import RunDir


@pytest.fixture
def tiny_run(tmp_path: Path) -> RunDir:
    return make_run(tmp_path)
