"""Run-directory reports: read ``metrics.jsonl``, plot it, write ``report/index.html``."""

from fedtune.report.html import write_report
from fedtune.report.plots import plot_bytes, plot_client_eval_loss, plot_global_loss
from fedtune.report.runs import ClientLoss, MetricRecord, RunTotals, loss_table, read_metrics, run_totals

__all__ = [
    "ClientLoss",
    "MetricRecord",
    "RunTotals",
    "loss_table",
    "plot_bytes",
    "plot_client_eval_loss",
    "plot_global_loss",
    "read_metrics",
    "run_totals",
    "write_report",
]
