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
