"""Bytes on the wire per client-round / fp32 size of the LoRA adapter, for one wire format.

Runs one short federated round (2 clients, 1 step) with the demo's model and adapter in
``fed.wire_dtype`` NAME, reads ``bytes_up`` and ``bytes_down`` of the training messages
from metrics.jsonl (payload bytes: tensor data with its scales or numpy header, keys,
config and metrics) and divides by the adapter's fp32 size. ``int8`` / ``nf4`` replies
carry the update (trained - sent), in blocks of ``--wire-block`` values.

Usage: python bench/bytes.py [--wire-dtype float16|float32|int8|nf4] [--wire-block 64]
       [--error-feedback] [--model smollm2]
Last line: ``bytes_ratio: X`` (up + down per client-round over one fp32 adapter).
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

GOALS = {"int8": (0.53, 0.265), "nf4": (0.30, 0.15)}  # up + down, and each direction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wire-dtype", default="float16", choices=["float16", "float32", "int8", "nf4"])
    parser.add_argument("--wire-block", type=int, default=64)
    parser.add_argument("--error-feedback", action="store_true")
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()

    from fedtune.config import load_config
    from fedtune.launch import run
    from fedtune.models.adapters import adapter_num_bytes, initial_adapter_state

    wire = args.wire_dtype
    cfg = load_config(
        "configs/demo.toml",
        [
            f"model.name='{args.model}'",
            "partition.num_partitions=2",
            "train.max_steps=1",
            "fed.rounds=1",
            "fed.fraction_evaluate=0.0",
            "fed.evaluate_before=false",
            f"fed.wire_dtype='{wire}'",
            f"fed.wire_block={args.wire_block}",
            f"fed.error_feedback={str(args.error_feedback).lower()}",
            f"run.output_dir='{tempfile.mkdtemp(prefix='fedtune-bytes-')}'",
            "run.report=false",
        ],
    )
    fp32 = adapter_num_bytes(initial_adapter_state(cfg.model, seed=0))
    rows = [r for r in run(cfg, progress=False).metrics() if r["phase"] == "train"]
    up = sum(r["bytes_up"] for r in rows) / len(rows)
    down = sum(r["bytes_down"] for r in rows) / len(rows)
    ratio = (up + down) / fp32
    print(
        f"{wire}: adapter_fp32_bytes={fp32} up={up:.0f} down={down:.0f} "
        f"up_ratio={up / fp32:.4f} down_ratio={down / fp32:.4f} up+down_ratio={ratio:.4f}"
    )
    if wire in GOALS:
        both, each = GOALS[wire]
        met = ratio <= both and max(up, down) / fp32 <= each
        print(f"goal: up+down <= {both}, each direction <= {each}: {'met' if met else 'MISSED'}")
    print(f"bytes_ratio: {ratio:.4f}")


if __name__ == "__main__":
    main()
