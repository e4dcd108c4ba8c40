"""The tiny run directory (tiny-llama, a non-zero untrained adapter) for eval and judge tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.rundir import RunDir
from helpers import finished_tiny_run


@pytest.fixture
def tiny_run(tmp_path: Path) -> RunDir:
    return finished_tiny_run(tmp_path)[0]
