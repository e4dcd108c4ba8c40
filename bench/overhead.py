"""Federated round time / the same training steps in a plain peft loop, side by side.

Both sides train the same clients, on the same data, for the same number of steps,
from the same starting adapter, in the same process tree on the same cores:

- federated: ``fedtune run`` machinery (Flower simulation runtime, Ray worker, adapter
  sent down and up as an fp16 ArrayRecord, FedAvg on the server); evaluation is off so
  a round is only training; rounds after the first are the steady state (the first
  also loads the model and data into the worker);
- plain: one process, the model loaded once, a loop over clients calling the same
  ``training.local.train`` with the adapter reset per client.

Usage: python bench/overhead.py [--model smollm2] [--clients 2] [--steps 5] [--rounds 3]
Last line: ``overhead_ratio: X`` (goal <= 1.05).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    from fedtune.config import load_config
    from fedtune.data.pipeline import client_tokenized
    from fedtune.launch import run
    from fedtune.models.adapters import attach_lora, initial_adapter_state, load_adapter_state
    from fedtune.models.load import load_model, load_tokenizer
    from fedtune.training.local import train

    out = tempfile.mkdtemp(prefix="fedtune-bench-")
    cfg = load_config(
        "configs/demo.toml",
        [
            f"model.name='{args.model}'",
            f"partition.num_partitions={args.clients}",
            f"train.max_steps={args.steps}",
            f"fed.rounds={args.rounds}",
            "fed.fraction_evaluate=0.0",
            "fed.evaluate_before=false",
            "model.lora.dropout=0.0",
            f"run.output_dir='{out}'",
            "run.report=false",
        ],
    )

    # plain peft loop: model loaded once, the same clients and steps per "round"
    tokenizer = load_tokenizer(cfg.model)
    model = attach_lora(load_model(cfg.model), cfg.model.lora)
    start_state = initial_adapter_state(cfg.model, seed=cfg.seed)
    data = [client_tokenized(cfg, tokenizer, pid)[0] for pid in range(args.clients)]

    def plain_rounds() -> list[float]:
        times = []
        for rnd in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            for pid, ds in enumerate(data):
                load_adapter_state(model, start_state)
                train(model, ds, tokenizer, cfg.train, seed=rnd * 100 + pid)
            times.append(time.perf_counter() - t0)
        return times

    # plain before and after the federated run, so drift in machine load cancels out
    plain = plain_rounds()[1:]
    run_dir = run(cfg, progress=False)
    fed_rounds = [r["seconds"] for r in run_dir.metrics() if r["phase"] == "server" and r["round"] >= 1]
    client_secs = [r["seconds"] for r in run_dir.metrics() if r["phase"] == "train"]

    plain += plain_rounds()[1:]
    steady_fed = statistics.mean(fed_rounds[1:])
    steady_plain = statistics.mean(plain)
    print(f"model: {args.model}  clients: {args.clients}  steps/client/round: {args.steps}")
    print(f"plain_round_s (before and after, first round of each dropped): {[round(x, 2) for x in plain]}")
    print(f"federated_round_s: {[round(x, 2) for x in fed_rounds]}")
    print(f"client_handler_s (inside ClientApp): {[round(x, 2) for x in client_secs]}")
    print(f"steady_plain_round_s: {steady_plain:.3f}")
    print(f"steady_federated_round_s: {steady_fed:.3f}")
    print(f"overhead_ratio: {steady_fed / steady_plain:.3f}")


if __name__ == "__main__":
    main()
