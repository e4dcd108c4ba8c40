"""Bytes on the wire per client-round / fp32 size of the LoRA adapter.

Runs one short federated round per wire dtype (fp16, the default, and fp32) with the
demo's model and adapter, reads ``bytes_up`` and ``bytes_down`` of the training
messages from metrics.jsonl (payload bytes: tensor data, keys, config and metrics),
and divides by the adapter's fp32 size.

Usage: python bench/bytes.py [--model smollm2]
Last line: ``bytes_ratio: X`` for the default wire dtype (up + down over one fp32 adapter).
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()

    from fedtune.config import load_config
    from fedtune.launch import run
    from fedtune.models.adapters import adapter_num_bytes, initial_adapter_state

    ratios = {}
    for wire in ("float16", "float32"):
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
                f"run.output_dir='{tempfile.mkdtemp(prefix='fedtune-bytes-')}'",
                "run.report=false",
            ],
        )
        fp32 = adapter_num_bytes(initial_adapter_state(cfg.model, seed=0))
        rows = [r for r in run(cfg, progress=False).metrics() if r["phase"] == "train"]
        up = sum(r["bytes_up"] for r in rows) / len(rows)
        down = sum(r["bytes_down"] for r in rows) / len(rows)
        ratios[wire] = (up + down) / fp32
        print(
            f"{wire}: adapter_fp32_bytes={fp32} up={up:.0f} down={down:.0f} "
            f"up_ratio={up / fp32:.3f} down_ratio={down / fp32:.3f} up+down_ratio={ratios[wire]:.3f}"
        )
    print(f"bytes_ratio: {ratios['float16']:.3f}")


if __name__ == "__main__":
    main()
