"""A SecAgg+ round and a client-level DP round / a plain one: wall time and bytes per client.

One Flower simulation (Ray) of the tiny config with 4 clients; after a warm-up round (the
workers load the model and data), plain, DP and SecAgg+ rounds alternate (ABCABC...), each
training the same clients from the same adapter with the same seeds (round 1's instructions
every time):

- plain: the strategy's instructions out, the trained adapters back (fp16), FedAvg;
- dp: the same with ``privacy.dp`` (noise multiplier 1, every client sampled): the clients clip
  their updates and send them in float32, the server checks, noises and accounts;
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
    private = cfg.model_copy(
        update={
            "privacy": cfg.privacy.model_copy(
                update={
                    "dp": True,
                    "noise_multiplier": 1.0,
                    "secagg": cfg.privacy.secagg.model_copy(update={"enabled": False}),
                }
            )
        }
    )
    found: dict[str, Any] = {
        "plain": [],
        "dp": [],
        "secagg": [],
        "plain_bytes": {},
        "dp_bytes": {},
        "secagg_bytes": {},
    }
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        clients = discover(grid, cfg).clients
        s, s_dp = build_strategy(cfg, clients), build_strategy(private, clients)
        start = {k: v.numpy() for k, v in initial_adapter_state(cfg.model, seed=cfg.seed).items()}
        arrays = to_record(start, "float32")

        def in_the_clear(strategy: Any, kind: str) -> Any:
            def one_round() -> float:
                t0 = time.perf_counter()
                messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
                replies = list(grid.send_and_receive(messages, timeout=cfg.fed.timeout))
                strategy.aggregate_train(1, replies)
                wall = time.perf_counter() - t0
                sizes = found[f"{kind}_bytes"]
                for m in messages:
                    sizes.setdefault(m.metadata.dst_node_id, [0, 0])[0] = payload_bytes(m.content)
                for r in replies:
                    sizes[r.metadata.src_node_id][1] = payload_bytes(r.content)
                return wall

            return one_round

        plain, dp = in_the_clear(s, "plain"), in_the_clear(s_dp, "dp")

        def secure() -> float:
            t0 = time.perf_counter()
            result = secure_round(grid, s.configure_train(1, arrays, ConfigRecord(), grid), cfg)
            wall = time.perf_counter() - t0
            found["secagg_bytes"] = {n: (result.bytes_down[n], result.bytes_up[n]) for n in result.bytes_down}
            return wall

        plain()  # warm-up: the workers load the model and tokenize their data
        for _ in range(args.repeats):
            found["plain"].append(plain())
            found["dp"].append(dp())
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
    d_down = sum(d for d, _ in found["dp_bytes"].values()) / n
    d_up = sum(u for _, u in found["dp_bytes"].values()) / n
    print(f"{'dp':<24} {statistics.median(found['dp']):>16.2f} {d_down:>14.0f} {d_up:>14.0f}")
    print(f"{'secagg':<24} {secure_wall:>16.2f} {sum(s_down):>14.0f} {sum(s_up):>14.0f}")
    for stage, down, up in zip(found["stages"], s_down, s_up, strict=True):
        print(f"{'  ' + stage:<24} {'':>16} {down:>14.0f} {up:>14.0f}")
    walls = {kind: [round(w, 2) for w in found[kind]] for kind in ("plain", "dp", "secagg")}
    print(f"walls (s): plain {walls['plain']}, dp {walls['dp']}, secagg {walls['secagg']}")
    print(f"dp_bytes_up_ratio: {d_up / p_up:.3f}")
    dp_pairs = [d / p for p, d in zip(found["plain"], found["dp"], strict=True)]
    print(f"dp_round_time_ratio: {statistics.median(dp_pairs):.3f}")
    print(f"secagg_bytes_down_ratio: {sum(s_down) / p_down:.3f}")
    print(f"secagg_bytes_up_ratio: {sum(s_up) / p_up:.3f}")
    print(f"ratio of the medians: {secure_wall / plain_wall:.3f}")
    pairs = [s / p for p, s in zip(found["plain"], found["secagg"], strict=True)]
    print(f"secagg_round_time_ratio: {statistics.median(pairs):.3f}")


if __name__ == "__main__":
    main()
