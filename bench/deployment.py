"""What a deployment round costs on top of the same round in simulation, side by side.

Both sides run the same config (demo.toml with the overrides below: 2 clients, 1 round,
3 training steps of batch 4 per client) on this machine's cores:

- simulation: ``fedtune run`` (Flower's simulation runtime, one Ray worker that keeps the
  model loaded between messages; with the default ``simulation.cpus_per_client`` the
  clients take turns);
- deployment: ``flower-superlink`` and two ``flower-supernode`` processes on loopback and
  ``flwr run`` of this app. Each message starts a fresh ``flwr-clientapp`` process that
  imports torch/transformers/peft and loads the model again; the two SuperNodes run
  their clients at the same time, sharing the cores, so both sides train with
  ``train.num_threads`` = cores // clients unless ``--threads`` says otherwise.

Round times are the server lines' ``seconds`` of round 1 (train, aggregate, evaluate and
checkpoint). ``*_train_s`` / ``*_evaluate_s`` are the mean time inside the ClientApp's
handlers; in deployment they include the model load and data preparation that the
simulation did once, in round 0. ``*_outside_handlers_s`` is the rest of the round: in
simulation the round minus all handlers (clients take turns), in deployment the round
minus the slowest client of each phase (clients run at once); that is process start,
imports, polling, transport, aggregation and the checkpoint. ``cold_*`` are one fresh
interpreter's import of the ClientApp module, model load and one client's data.

Usage: python bench/deployment.py [--model smollm2] [--steps 3] [--threads N]
Last line: ``deployment_round_overhead_s: X`` (deployment round - simulation round).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedtune.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the loopback deployment is a test harness, not library code
from loopback import LoopbackDeployment, flwr_env  # noqa: E402

BIN = Path(sys.executable).parent
CONFIG = "configs/demo.toml"
COLD_START = """
import time
t0 = time.perf_counter()
import fedtune.federated.client_app  # what every flwr-clientapp process imports
t1 = time.perf_counter()
from fedtune.config import load_config
from fedtune.models.adapters import attach_lora
from fedtune.models.load import load_model, load_tokenizer
from fedtune.data.pipeline import client_tokenized
cfg = load_config({config!r}, {overrides!r})
tokenizer = load_tokenizer(cfg.model)
attach_lora(load_model(cfg.model), cfg.model.lora)
t2 = time.perf_counter()
client_tokenized(cfg, tokenizer, 0)
print(t1 - t0, t2 - t1, time.perf_counter() - t2)
"""


def _metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The metrics of the one run directory under ``out_dir``."""
    (run,) = (RunDir.open(p) for p in out_dir.iterdir() if p.is_dir())
    return run.metrics()


def _round(metrics: list[dict[str, Any]], server_round: int = 1) -> dict[str, Any]:
    """Server-line seconds and per-phase handler seconds (one per client) of a round."""
    lines = [m for m in metrics if m["round"] == server_round]
    return {
        "round": next(m["seconds"] for m in lines if m["phase"] == "server"),
        "train": [m["seconds"] for m in lines if m["phase"] == "train"],
        "evaluate": [m["seconds"] for m in lines if m["phase"] == "evaluate"],
    }


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        help="train.num_threads per client; default cores // clients, 0 for torch's own default",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per runtime")
    args = parser.parse_args()
    clients = 2
    # The deployment's SuperNodes train at the same time on this machine's cores; torch's
    # default (every core per process) oversubscribes them: 90 s instead of 5 s per client.
    threads = max(1, (os.cpu_count() or 1) // clients) if args.threads is None else args.threads
    overrides = [
        f"model.name={args.model}",
        f"partition.num_partitions={clients}",
        "fed.rounds=1",
        f"train.max_steps={args.steps}",
        "train.batch_size=4",
        "data.max_train_examples=16",
        "data.max_test_examples=8",
        "run.report=false",
    ]
    if threads:
        overrides.append(f"train.num_threads={threads}")

    with tempfile.TemporaryDirectory(prefix="fedtune-bench-deploy-") as tmp:
        root = Path(tmp)
        env = flwr_env(root / "cli")

        sim_out = root / "simulation"
        sets = [a for o in [*overrides, f"run.output_dir={sim_out}"] for a in ("--set", o)]
        sim_wall = _run(
            [str(BIN / "fedtune"), "run", "--config", CONFIG, *sets, "--no-progress"], env, args.timeout
        )
        sim = _round(_metrics(sim_out))

        dep_out = root / "deployment"
        with LoopbackDeployment(root, clients) as deployment:
            env = deployment.connect("bench")  # FLWR_HOME <root>/cli, as for the simulation
            run_config = (
                f"config-file='{CONFIG}' overrides='{' '.join([*overrides, f'run.output_dir={dep_out}'])}'"
            )
            dep_wall = _run(
                [str(BIN / "flwr"), "run", str(REPO), "bench", "--run-config", run_config, "--stream"],
                env,
                args.timeout,
            )
        dep = _round(_metrics(dep_out))

        cold = subprocess.run(
            [sys.executable, "-c", COLD_START.format(config=CONFIG, overrides=overrides)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        cold_import, cold_load, cold_data = map(float, cold.stdout.split()[-3:])

    sim_outside = sim["round"] - sum(sim["train"]) - sum(sim["evaluate"])  # clients in turn
    dep_outside = dep["round"] - max(dep["train"]) - max(dep["evaluate"])  # clients at once
    print(f"model: {args.model}")
    print(f"clients: {clients}")
    print(f"train_steps: {args.steps}")
    print(f"threads_per_client: {threads or 'torch default'}")
    print(f"simulation_wall_s: {sim_wall:.2f}")
    print(f"deployment_wall_s: {dep_wall:.2f}")
    print(f"simulation_round_s: {sim['round']:.2f}")
    print(f"deployment_round_s: {dep['round']:.2f}")
    print(f"simulation_train_s: {statistics.mean(sim['train']):.2f}")
    print(f"deployment_train_s: {statistics.mean(dep['train']):.2f}")
    print(f"simulation_evaluate_s: {statistics.mean(sim['evaluate']):.2f}")
    print(f"deployment_evaluate_s: {statistics.mean(dep['evaluate']):.2f}")
    print(f"simulation_outside_handlers_s: {sim_outside:.2f}")
    print(f"deployment_outside_handlers_s: {dep_outside:.2f}")
    print(f"cold_import_s: {cold_import:.2f}")
    print(f"cold_model_load_s: {cold_load:.2f}")
    print(f"cold_client_data_s: {cold_data:.2f}")
    print(f"deployment_round_overhead_s: {dep['round'] - sim['round']:.2f}")


if __name__ == "__main__":
    main()
