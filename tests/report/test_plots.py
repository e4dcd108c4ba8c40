"""Tests for fedtune.report.plots: each plot writes a valid PNG, with or without data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from fedtune.report.plots import human_bytes, plot_bytes, plot_client_eval_loss, plot_global_loss
from fedtune.report.runs import MetricRecord, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PlotFn = Callable[[Sequence[MetricRecord], Path], Path]


@pytest.mark.parametrize("plot", [plot_client_eval_loss, plot_global_loss, plot_bytes])
def test_plot_writes_png(run_dir: Path, plot: PlotFn) -> None:
    out = plot(read_metrics(run_dir), run_dir / "nested" / "plot.png")
    assert out == run_dir / "nested" / "plot.png"
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("plot", [plot_client_eval_loss, plot_global_loss, plot_bytes])
def test_plot_without_records(tmp_path: Path, plot: PlotFn) -> None:
    out = plot([], tmp_path / "empty.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 * 1024**2, "3.0 MiB"), (5 * 1024**4, "5120.0 GiB")],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text
