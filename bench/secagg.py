"""A SecAgg+ training round / a plain one: wall time and bytes per client, side by side.

One Flower simulation (Ray) of the tiny config with 4 clients; after a warm-up round (the
workers load the model and data), plain and SecAgg+ rounds alternate (ABAB...), each training
the same clients from the same adapter with the same seeds (round 1's instructions every time):

- plain: the strategy's instructions out, the trained adapters back (fp16), FedAvg;
- secagg: the same instructions through Flower's ``SecAggPlusWorkflow`` and ``secaggplus_mod``
  (``fedtune.federated.secagg.secure_round``): 4 stages, the masked update back (one int64 per
  coordinate), the mean unmasked on the server.

Bytes are payload bytes by one convention for both (tensor data, keys, 8 bytes a number, the
length of text and bytes), per client, summed over the stages.

Usage: python bench/secagg.py [--config configs/tiny.toml] [--clients 4] [--repeats 5] [--set K=V ...]
Last line: ``secagg_round_time_ratio: X``, the median over the pairs of (SecAgg+ round / the plain
round just before it): adjacent rounds see the same background load on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], help="dotted config override")
    args = parser.parse_args()

    from flwr.app import ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp

    from fedtune.config import load_config
    from fedtune.federated.records import to_record
    from fedtune.federated.secagg import STAGES, payload_bytes, secure_round
    from fedtune.federated.server_app import discover
    from fedtune.federated.simulation import run_server_app
    from fedtune.federated.strategies import build_strategy
    from fedtune.models.adapters import initial_adapter_state

    cfg = load_config(
        args.config,
        [
            f"partition.num_partitions={args.clients}",
            "privacy.secagg.enabled=true",
            f"run.output_dir='{tempfile.mkdtemp(prefix='fedtune-secagg-')}'",
            *args.set,
        ],
    )
    found: dict[str, Any] = {"plain": [], "secagg": [], "plain_bytes": {}, "secagg_bytes": {}}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        s = build_strategy(cfg, discover(grid, cfg))
        start = {k: v.numpy() for k, v in initial_adapter_state(cfg.model, seed=cfg.seed).items()}
        arrays = to_record(start, "float32")

        def plain() -> float:
            t0 = time.perf_counter()
            messages = list(s.configure_train(1, arrays, ConfigRecord(), grid))
            replies = list(grid.send_and_receive(messages, timeout=cfg.fed.timeout))
            s.aggregate_train(1, replies)
            wall = time.perf_counter() - t0
            for m in messages:
                found["plain_bytes"].setdefault(m.metadata.dst_node_id, [0, 0])[0] = payload_bytes(m.content)
            for r in replies:
                found["plain_bytes"][r.metadata.src_node_id][1] = payload_bytes(r.content)
            return wall

        def secure() -> float:
            t0 = time.perf_counter()
            result = secure_round(grid, s.configure_train(1, arrays, ConfigRecord(), grid), cfg)
            wall = time.perf_counter() - t0
            found["secagg_bytes"] = {n: (result.bytes_down[n], result.bytes_up[n]) for n in result.bytes_down}
            return wall

        plain()  # warm-up: the workers load the model and tokenize their data
        for _ in range(args.repeats):
            found["plain"].append(plain())
            found["secagg"].append(secure())
        found["stages"] = STAGES

    run_server_app(cfg, server)
    _report(found)


def _report(found: dict[str, Any]) -> None:
    plain_wall, secure_wall = statistics.median(found["plain"]), statistics.median(found["secagg"])
    n = len(found["plain_bytes"])
    p_down = sum(d for d, _ in found["plain_bytes"].values()) / n
    p_up = sum(u for _, u in found["plain_bytes"].values()) / n
    s_down = [sum(d[i] for d, _ in found["secagg_bytes"].values()) / n for i in range(4)]
    s_up = [sum(u[i] for _, u in found["secagg_bytes"].values()) / n for i in range(4)]
    print(f"{'round':<24} {'wall s (median)':>16} {'down B/client':>14} {'up B/client':>14}")
    print(f"{'plain':<24} {plain_wall:>16.2f} {p_down:>14.0f} {p_up:>14.0f}")
    print(f"{'secagg':<24} {secure_wall:>16.2f} {sum(s_down):>14.0f} {sum(s_up):>14.0f}")
    for stage, down, up in zip(found["stages"], s_down, s_up, strict=True):
        print(f"{'  ' + stage:<24} {'':>16} {down:>14.0f} {up:>14.0f}")
    walls = {kind: [round(w, 2) for w in found[kind]] for kind in ("plain", "secagg")}
    print(f"walls (s): plain {walls['plain']}, secagg {walls['secagg']}")
    print(f"secagg_bytes_down_ratio: {sum(s_down) / p_down:.3f}")
    print(f"secagg_bytes_up_ratio: {sum(s_up) / p_up:.3f}")
    print(f"ratio of the medians: {secure_wall / plain_wall:.3f}")
    pairs = [s / p for p, s in zip(found["plain"], found["secagg"], strict=True)]
    print(f"secagg_round_time_ratio: {statistics.median(pairs):.3f}")


if __name__ == "__main__":
    main()
