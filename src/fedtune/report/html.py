"""Write a run's ``report/`` folder: three PNG plots and one self-contained ``index.html``."""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from pathlib import Path

from fedtune.errors import FedtuneError
from fedtune.io import atomic_folder
from fedtune.report.evaluation import eval_sections
from fedtune.report.plots import (
    human_bytes,
    plot_bytes,
    plot_client_eval_loss,
    plot_global_loss,
    plot_privacy,
)
from fedtune.report.runs import (
    ClientLoss,
    MetricRecord,
    RunTotals,
    failure_lines,
    loss_table,
    read_metrics,
    run_totals,
)
from fedtune.rundir import REPORT_PAGE, RunDir

__all__ = ["render_html", "write_report"]

logger = logging.getLogger(__name__)

_PLOTS = (
    ("client_eval_loss.png", plot_client_eval_loss, "Eval loss per client"),
    ("global_loss.png", plot_global_loss, "Global train and eval loss"),
    ("bytes.png", plot_bytes, "Bytes per round"),
)

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; } th, td { padding: .25rem .75rem; border-bottom: 1px solid #ddd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: .75rem; overflow-x: auto; font-size: .85rem; }
img { max-width: 100%; display: block; margin: 1rem 0; }
code { background: #f6f6f6; padding: 0 .2rem; }
"""


def _loss_rows(losses: Sequence[ClientLoss]) -> str:
    if not losses:
        return '<tr><td colspan="4">no per-client evaluation records</td></tr>'
    return "\n".join(
        f'<tr><td>client {c.client}</td><td class="num">{c.before:.4f}</td>'
        f'<td class="num">{c.after:.4f}</td><td class="num">{c.after - c.before:+.4f}</td></tr>'
        for c in losses
    )


def _blank(value: object) -> str:
    return "" if value is None else html.escape(str(value))


def _failures(failures: Sequence[MetricRecord]) -> str:
    """A table of the clients that failed, one row per failure line; nothing when none did."""
    if not failures:
        return ""
    rows = "\n".join(
        f'<tr><td class="num">{f.get("round")}</td><td>{html.escape(str(f.get("phase")))}</td>'
        f'<td class="num">{_blank(f.get("client"))}</td><td class="num">{_blank(f.get("node"))}</td>'
        f"<td>{html.escape(str(f.get('cause', '')))}</td></tr>"
        for f in failures
    )
    return f"""
<h2>Client failures ({len(failures)})</h2>
<table>
<thead><tr><th>round</th><th>phase</th><th>client</th><th>node</th><th>cause</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
"""


def _totals_rows(totals: RunTotals) -> str:
    rows = [
        ("rounds", str(totals.rounds)),
        ("bytes up", f"{totals.bytes_up:,} ({human_bytes(totals.bytes_up)})"),
        ("bytes down", f"{totals.bytes_down:,} ({human_bytes(totals.bytes_down)})"),
        ("server seconds", f"{totals.seconds:.1f}"),
    ]
    return "\n".join(f'<tr><th>{name}</th><td class="num">{value}</td></tr>' for name, value in rows)


def render_html(
    run_dir: Path,
    config_text: str,
    losses: Sequence[ClientLoss],
    totals: RunTotals,
    images: Sequence[tuple[str, str]],
    failures: Sequence[MetricRecord] = (),
    evaluation: str = "",
) -> str:
    """The report page as a string; ``images`` are ``(src, alt)`` with ``src`` relative to the page.

    ``failures``: the failure lines of ``metrics.jsonl``, tabled when there are any.
    ``evaluation``: the sections of ``fedtune eval`` / ``fedtune judge`` results (HTML).
    """
    title = f"fedtune report: {html.escape(run_dir.name)}"
    figures = "\n".join(f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">' for src, alt in images)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{title}</h1>
<p>Run directory: <code>{html.escape(str(run_dir))}</code></p>

<h2>Eval loss per client</h2>
<table>
<thead><tr><th>client</th><th>before</th><th>after</th><th>change</th></tr></thead>
<tbody>
{_loss_rows(losses)}
</tbody>
</table>

<h2>Totals</h2>
<table>
{_totals_rows(totals)}
</table>
{_failures(failures)}
{evaluation}
<h2>Plots</h2>
{figures}

<h2>Configuration</h2>
<pre>{html.escape(config_text)}</pre>
</body>
</html>
"""


def write_report(run_dir: Path | str) -> Path:
    """Write ``run_dir/report/`` (three PNGs and ``index.html``) and return the page's path.

    The folder is built in a temporary sibling and swapped in, so a failure leaves any
    earlier report untouched and a reader never sees half a report.

    Raises
    ------
    FedtuneError
        ``config.toml`` or ``metrics.jsonl`` is missing, or a metrics line is malformed.
    """
    run = RunDir(run_dir)
    try:
        config_text = run.config_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FedtuneError(f"{run.config_file}: not found (is {run.path} a fedtune run directory?)") from None
    records = read_metrics(run.path)

    plots = list(_PLOTS)
    if any("epsilon" in r for r in records):  # a run with client-level DP
        plots.append(("privacy.png", plot_privacy, "Privacy spent per round"))
    with atomic_folder(run.report_dir) as staging:
        for filename, plot, _ in plots:
            plot(records, staging / filename)
        page = render_html(
            run.path,
            config_text,
            loss_table(records),
            run_totals(records),
            [(filename, alt) for filename, _, alt in plots],
            failure_lines(records),
            eval_sections(run.path),
        )
        (staging / REPORT_PAGE).write_text(page, encoding="utf-8")
    logger.info("wrote report %s", run.report_page)
    return run.report_page
