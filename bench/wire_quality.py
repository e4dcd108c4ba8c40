"""Held-out loss of the demo with compressed updates / the same run in float16.

Runs ``configs/demo.toml`` (SmolLM2, 8 clients, 3 rounds x 4 steps) once per wire format,
without the round-0 evaluation and the report (neither changes training), and reads the
final round's held-out loss (the clients' example-weighted mean) from metrics.jsonl. A
format ``NAME+ef`` turns on ``fed.error_feedback``. ``--baseline DIR`` reads the float16
figure from a finished run directory of the same config instead of running it again.

Note: the clients evaluate the global adapter as they receive it, i.e. rounded to the wire
format (the server keeps and saves float32).

Usage: python bench/wire_quality.py [--formats float16,int8,nf4,nf4+ef] [--baseline DIR]
       [--set KEY=VALUE ...]
Last line: ``worst_loss_ratio: X`` (the largest final loss / float16's; goal <= 1.01).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


def final_loss(rows: list[dict]) -> float:
    """The last round's server line: the clients' example-weighted held-out loss."""
    server = [r for r in rows if r["phase"] == "server" and r.get("eval_loss") is not None]
    return float(server[-1]["eval_loss"])


def run_format(name: str, extra: list[str]) -> tuple[float, float]:
    """(final held-out loss, seconds) of the demo in wire format ``name`` (``+ef``: error feedback)."""
    from fedtune.config import load_config
    from fedtune.launch import run

    wire, _, ef = name.partition("+")
    cfg = load_config(
        "configs/demo.toml",
        [
            f"fed.wire_dtype='{wire}'",
            f"fed.error_feedback={'true' if ef == 'ef' else 'false'}",
            "fed.evaluate_before=false",
            "run.report=false",
            f"run.output_dir='{tempfile.mkdtemp(prefix='fedtune-wire-')}'",
            *extra,
        ],
    )
    start = time.perf_counter()
    rows = run(cfg, progress=False).metrics()
    return final_loss(rows), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="float16,int8,nf4,nf4+ef")
    parser.add_argument("--baseline", help="a finished float16 run directory of the same config")
    parser.add_argument("--set", action="append", default=[], dest="extra")
    args = parser.parse_args()

    from fedtune.rundir import RunDir

    losses: dict[str, float] = {}
    for name in args.formats.split(","):
        if name == "float16" and args.baseline:
            continue
        losses[name], seconds = run_format(name, args.extra)
        print(f"{name}: final_eval_loss={losses[name]:.4f} ({seconds:.0f} s)", flush=True)
    if args.baseline:  # read last: it may be a run still going when this script starts
        losses["float16"] = final_loss(RunDir.open(args.baseline).metrics())
        print(f"float16: final_eval_loss={losses['float16']:.4f} (from {args.baseline})", flush=True)
    base = losses["float16"]
    ratios = {n: v / base for n, v in losses.items() if n != "float16"}
    for name, ratio in ratios.items():
        print(f"{name}: loss / float16's = {ratio:.4f} ({(ratio - 1) * 100:+.2f} %)")
    print(f"worst_loss_ratio: {max(ratios.values()):.4f}")


if __name__ == "__main__":
    main()
