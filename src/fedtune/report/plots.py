"""PNG plots of a run's metrics, drawn with matplotlib's Agg canvas.

Figures are built with :class:`matplotlib.figure.Figure` and an explicit Agg canvas
rather than ``pyplot``, so no global figure state or GUI backend is involved and the
functions are safe to call from worker threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedtune.io import atomic_file
from fedtune.report.runs import (
    MetricRecord,
    bytes_per_round,
    client_eval_curves,
    run_totals,
    server_curve,
)

__all__ = ["human_bytes", "plot_bytes", "plot_client_eval_loss", "plot_global_loss", "plot_privacy"]

_SIZE = (7.0, 4.0)  # inches; at 110 dpi a 770 x 440 image that fits an HTML column
_DPI = 110
_MAX_LEGEND = 10  # a legend of more lines than this covers the plot


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``; binary units, one decimal above bytes."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _new_axes(title: str, ylabel: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Figure, ax: Axes, path: Path | str, empty: str) -> Path:
    if ax.has_data():
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="grey")
    out = Path(path)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png")
    return out


def plot_client_eval_loss(records: Sequence[MetricRecord], path: Path | str) -> Path:
    """One line per client: its eval loss at each evaluated round. Returns ``path``."""
    fig, ax = _new_axes("Eval loss per client", "eval loss")
    curves = client_eval_curves(records)
    labelled = len(curves) <= _MAX_LEGEND
    for client, curve in curves.items():
        rounds, losses = zip(*curve, strict=True)
        ax.plot(rounds, losses, marker="o", markersize=3, label=f"client {client}" if labelled else None)
    return _save(fig, ax, path, "no per-client evaluation records")


def plot_global_loss(records: Sequence[MetricRecord], path: Path | str) -> Path:
    """Server (example-weighted) train and eval loss per round. Returns ``path``."""
    fig, ax = _new_axes("Global loss", "loss")
    for label, curve in (
        ("train", server_curve(records, "train_loss")),
        ("eval", server_curve(records, "eval_loss")),
    ):
        if curve:
            rounds, losses = zip(*curve, strict=True)
            ax.plot(rounds, losses, marker="o", markersize=3, label=label)
    return _save(fig, ax, path, "no server records")


def plot_bytes(records: Sequence[MetricRecord], path: Path | str) -> Path:
    """Bytes sent up (clients to server) and down per round, totals in the title. Returns ``path``."""
    totals = run_totals(records)
    fig, ax = _new_axes(
        f"Communication: {human_bytes(totals.bytes_up)} up, {human_bytes(totals.bytes_down)} down",
        "bytes",
    )
    per_round = bytes_per_round(records)
    if per_round:
        rounds = list(per_round)
        width = 0.4
        ax.bar([r - width / 2 for r in rounds], [up for up, _ in per_round.values()], width, label="up")
        ax.bar([r + width / 2 for r in rounds], [down for _, down in per_round.values()], width, label="down")
        ax.yaxis.set_major_formatter(lambda value, _pos: human_bytes(value))
    return _save(fig, ax, path, "no byte counts")


def plot_privacy(records: Sequence[MetricRecord], path: Path | str) -> Path:
    """ε spent after each round (client-level DP), by each accountant. Returns ``path``."""
    fig, ax = _new_axes("Privacy spent (client-level DP)", "ε")
    keys: tuple[tuple[str, Literal["epsilon", "epsilon_rdp", "epsilon_pld"]], ...] = (
        ("ε (run's accountant)", "epsilon"),
        ("RDP", "epsilon_rdp"),
        ("PLD", "epsilon_pld"),
    )
    for label, key in keys:
        if curve := server_curve(records, key):
            rounds, values = zip(*curve, strict=True)
            style = {"linewidth": 2.5} if key == "epsilon" else {"linestyle": "--"}
            ax.plot(rounds, values, marker="o", markersize=3, label=label, **style)
    return _save(fig, ax, path, "no privacy records (privacy.dp off)")
