"""What a deployment round costs beyond the engine's own floor, against the same round in simulation.

Three runs on this machine's cores, side by side:

- simulation: ``fedtune run`` (Flower's simulation runtime; one Ray worker keeps the model
  loaded between messages);
- deployment: ``flower-superlink`` and two ``flower-supernode`` processes on loopback, each
  SuperNode with a warm node worker (``fedtune node``, which loads the model at start and
  keeps it and the client's data across messages), and ``flwr run`` of this app;
- the floor: a trivial Flower app (bench/floor_app: numpy arrays the size of the adapter,
  train + evaluate per round, clients that only echo) on the same SuperLink and SuperNodes.
  It costs what any app pays there: a ``flwr-clientapp`` process per message and Flower's
  polling (an idle SuperNode asks for work every 3 s). It sends the adapter's values in one
  array, as fedtune does (protocol 2 packs an adapter's tensors into one ``Array``).
  With ``--per-tensor-floor`` it runs again with as many distinct arrays as the adapter has
  tensors, as fedtune sent them before packing: Flower moves every array as objects of its
  own, which is what packing saves.

Both fedtune runs get the same config (demo.toml with the overrides below: 2 clients, 2
rounds, 3 training steps of batch 4 per client, ``train.num_threads`` = cores // clients).
A round's time is its server line's ``seconds`` (train, aggregate, evaluate, checkpoint),
averaged over rounds 1 and 2; the floor's is the median of its rounds.

Usage: python bench/deployment.py [--model smollm2] [--steps 3] [--threads N] [--rounds 2]
       [--per-tensor-floor]
Last line: ``deployment_over_simulation: X`` = (deployment round - floor round) / simulation round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedtune.config import load_config
from fedtune.models.adapters import initial_adapter_state
from fedtune.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the loopback deployment is a test harness, not library code
from loopback import LoopbackDeployment, flwr_env  # noqa: E402
from node_workers import NodeWorkers  # noqa: E402

BIN = Path(sys.executable).parent
CONFIG = "configs/demo.toml"
FLOOR_APP = REPO / "bench" / "floor_app"


def _metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The metrics of the one run directory under ``out_dir``."""
    (run,) = (RunDir.open(p) for p in out_dir.iterdir() if p.is_dir())
    return run.metrics()


def _rounds(metrics: list[dict[str, Any]], rounds: int) -> dict[str, float]:
    """Mean server-line seconds and mean handler seconds over rounds 1..``rounds``."""
    lines = [m for m in metrics if 1 <= m["round"] <= rounds and "seconds" in m]  # not failure lines
    return {
        phase: statistics.mean(m["seconds"] for m in lines if m["phase"] == phase)
        for phase in ("server", "train", "evaluate")
    }


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _overrides(args: argparse.Namespace, clients: int, threads: int) -> list[str]:
    overrides = [
        f"model.name={args.model}",
        f"partition.num_partitions={clients}",
        f"fed.rounds={args.rounds}",
        f"train.max_steps={args.steps}",
        "train.batch_size=4",
        "data.max_train_examples=16",
        "data.max_test_examples=8",
        "run.report=false",
    ]
    return [*overrides, f"train.num_threads={threads}"] if threads else overrides


def _floor(env: dict[str, str], out: Path, clients: int, timeout: float, pieces: int = 1) -> list[float]:
    """The trivial app's round times on the deployment that ``env`` connects to."""
    run_config = f"rounds=3 nodes={clients} pieces={pieces} out='{out}'"
    cmd = [str(BIN / "flwr"), "run", str(FLOOR_APP), "bench", "--run-config", run_config, "--stream"]
    _run(cmd, env, timeout)
    return [float(t) for t in json.loads(out.read_text())["round_s"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        help="train.num_threads per client; default cores // clients, 0 for torch's own default",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per runtime")
    parser.add_argument(
        "--per-tensor-floor", action="store_true", help="also time the floor with one array per tensor"
    )
    args = parser.parse_args()
    clients = 2
    # The deployment's clients train at the same time on this machine's cores; torch's
    # default (every core per process) oversubscribes them: 90 s instead of 5 s per client.
    threads = max(1, (os.cpu_count() or 1) // clients) if args.threads is None else args.threads
    overrides = _overrides(args, clients, threads)

    with tempfile.TemporaryDirectory(prefix="fedtune-bench-deploy-") as tmp:
        root = Path(tmp)
        env = flwr_env(root / "cli")
        sim_out = root / "simulation"
        sets = [a for o in [*overrides, f"run.output_dir={sim_out}"] for a in ("--set", o)]
        sim_wall = _run(
            [str(BIN / "fedtune"), "run", "--config", CONFIG, *sets, "--no-progress"], env, args.timeout
        )
        sim = _rounds(_metrics(sim_out), args.rounds)

        dep_out = root / "deployment"
        workers = NodeWorkers(root, clients, config=CONFIG, overrides=overrides, env=env)
        with workers, LoopbackDeployment(root, clients, node_config=workers.node_config()) as deployment:
            env = deployment.connect("bench")  # FLWR_HOME <root>/cli, as for the simulation
            floor = _floor(env, root / "floor.json", clients, args.timeout)
            tensors = len(initial_adapter_state(load_config(CONFIG, overrides).model, seed=0))
            floor_tensors = (
                _floor(env, root / "floor-tensors.json", clients, args.timeout, tensors)
                if args.per_tensor_floor
                else []
            )
            run_config = (
                f"config-file='{CONFIG}' overrides='{' '.join([*overrides, f'run.output_dir={dep_out}'])}'"
            )
            dep_wall = _run(
                [str(BIN / "flwr"), "run", str(REPO), "bench", "--run-config", run_config, "--stream"],
                env,
                args.timeout,
            )
            served = sum(workers.log(i).count("message of run") for i in range(clients))
        dep = _rounds(_metrics(dep_out), args.rounds)

    floor_round = statistics.median(floor)
    print(f"model: {args.model}")
    print(f"clients: {clients}")
    print(f"rounds: {args.rounds}")
    print(f"train_steps: {args.steps}")
    print(f"threads_per_client: {threads or 'torch default'}")
    print(f"simulation_wall_s: {sim_wall:.2f}")
    print(f"deployment_wall_s: {dep_wall:.2f}")
    print(f"messages_served_by_workers: {served}")
    print(f"simulation_round_s: {sim['server']:.2f}")
    print(f"deployment_round_s: {dep['server']:.2f}")
    print(f"floor_round_s: {floor_round:.2f} (rounds: {', '.join(f'{t:.2f}' for t in floor)})")
    print(f"simulation_train_s: {sim['train']:.2f}")
    print(f"deployment_train_s: {dep['train']:.2f}")
    print(f"simulation_evaluate_s: {sim['evaluate']:.2f}")
    print(f"deployment_evaluate_s: {dep['evaluate']:.2f}")
    if floor_tensors:
        print(
            f"floor_per_tensor_round_s: {statistics.median(floor_tensors):.2f} "
            f"({tensors} distinct arrays, as fedtune sent them before packing)"
        )
    print(f"deployment_round_overhead_s: {dep['server'] - sim['server']:.2f}")
    print(f"deployment_over_simulation: {(dep['server'] - floor_round) / sim['server']:.3f}")


if __name__ == "__main__":
    main()
