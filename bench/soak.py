"""Soak: many SuperNodes, many rounds, clients killed at random; no round lost, memory bounded.

A SuperLink and ``--nodes`` SuperNodes on loopback, each with a warm node worker
(``fedtune node``) pinned to one core (cores split round-robin, one torch thread each), run
``--rounds`` rounds of the tiny config with ``flwr run``. Every ``--kill-every`` seconds a
random client dies: its worker is SIGKILLed (and restarted, as systemd's ``Restart=`` would)
or the ``flwr-clientapp`` process working its message is. The round loop completes a round
on the replies that arrive when its quorum holds.

Meanwhile every process's resident memory is sampled: the SuperLink with its ServerApp,
each SuperNode, each worker. A footprint is bounded when its peak over the last third of
the run is within ``--growth`` of its peak over the first third.

Usage: python bench/soak.py [--nodes 10] [--rounds 20] [--kill-every 45] [--seed 0]
Last line: ``soak_rounds_completed: X`` (rounds completed / planned).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the loopback deployment is a test harness, not library code
from loopback import LoopbackDeployment  # noqa: E402
from node_workers import NodeWorkers  # noqa: E402

BIN = Path(sys.executable).parent
CONFIG = "configs/tiny.toml"


class Sampler(threading.Thread):
    """RSS of named process trees every ``period`` seconds: ``{name: [(t, bytes), ...]}``."""

    def __init__(self, roots: dict[str, Callable[[], int]], period: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.roots, self.period = roots, period
        self.samples: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.wait(self.period):
            for name, pid_of in self.roots.items():
                try:
                    proc = psutil.Process(pid_of())
                    tree = [proc, *proc.children(recursive=True)]
                    rss = sum(p.memory_info().rss for p in tree if p.is_running())
                except (psutil.Error, OSError):
                    continue
                self.samples[name].append((time.monotonic() - t0, rss))


def _kill_one(rng: random.Random, workers: NodeWorkers, deployment: LoopbackDeployment) -> str:
    """Kill a random client: its worker (restarted) or its running flwr-clientapp process."""
    i = rng.randrange(workers.num_nodes)
    if rng.random() < 0.5:
        for proc in psutil.Process(deployment.procs[1 + i].pid).children(recursive=True):
            try:
                if "flwr-clientapp" in " ".join(proc.cmdline()):
                    proc.kill()
                    return f"killed the flwr-clientapp of node {i}"
            except psutil.NoSuchProcess:  # it finished meanwhile
                continue
    workers.restart(i)
    return f"killed and restarted worker {i}"


def _pin(workers: NodeWorkers) -> None:
    cores = sorted(os.sched_getaffinity(0))
    for i, proc in enumerate(workers.procs):
        psutil.Process(proc.pid).cpu_affinity([cores[i % len(cores)]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--kill-every", type=float, default=45.0, help="seconds between kills (0: none)")
    parser.add_argument("--growth", type=float, default=0.10, help="allowed late/early peak RSS growth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    overrides = [
        f"partition.num_partitions={args.nodes}",
        f"fed.rounds={args.rounds}",
        "train.num_threads=1",
        "train.max_steps=2",
        "run.report=false",
        "fed.timeout=300",
        "fed.round_timeout=150",  # a killed flwr-clientapp is reported after Flower's heartbeats (~60 s)
        "fed.min_train_fraction=0.5",
        "fed.round_retries=2",
    ]
    rng = random.Random(args.seed)
    events: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fedtune-soak-") as tmp:
        root, out_dir = Path(tmp), Path(tmp) / "runs"
        workers = NodeWorkers(root / "w", args.nodes, config=CONFIG, overrides=overrides)
        with workers, LoopbackDeployment(root, args.nodes, node_config=workers.node_config()) as dep:
            _pin(workers)
            roots: dict[str, Callable[[], int]] = {"superlink+serverapp": lambda: dep.procs[0].pid}
            roots.update({f"supernode-{i}": (lambda i=i: dep.procs[1 + i].pid) for i in range(args.nodes)})
            roots.update({f"worker-{i}": (lambda i=i: workers.procs[i].pid) for i in range(args.nodes)})
            sampler = Sampler(roots)
            sampler.start()
            env = dep.connect("soak", default=True)
            run_config = (
                f"config-file='{CONFIG}' overrides='{' '.join([*overrides, f'run.output_dir={out_dir}'])}'"
            )
            cli = subprocess.Popen(
                [str(BIN / "flwr"), "run", str(REPO), "soak", "--run-config", run_config, "--stream"],
                env=env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            t0, next_kill = time.monotonic(), time.monotonic() + args.kill_every
            try:
                while cli.poll() is None and time.monotonic() - t0 < args.timeout:
                    if args.kill_every and time.monotonic() > next_kill:
                        events.append(f"{time.monotonic() - t0:.0f} s: {_kill_one(rng, workers, dep)}")
                        _pin(workers)
                        next_kill = time.monotonic() + args.kill_every
                    time.sleep(1)
            finally:
                if cli.poll() is None:
                    cli.kill()
                    cli.wait()
            wall = time.monotonic() - t0
            sampler.stop.set()
            logs = [p.read_text(errors="replace") for p in root.glob("supernode-*.log")]
            fell_back = sum("no node worker" in text for text in logs)
            events.append(f"nodes that worked without their worker: {fell_back}")
        lines = [json.loads(x) for p in out_dir.glob("*/metrics.jsonl") for x in p.read_text().splitlines()]
    _report(args, lines, sampler.samples, events, wall)


def _report(
    args: argparse.Namespace, lines: list[dict], samples: dict, events: list[str], wall: float
) -> None:
    completed = {x["round"] for x in lines if x.get("phase") == "server" and x["round"] >= 1}
    failures = [x for x in lines if x.get("event") == "failure"]
    print(f"nodes: {args.nodes}  rounds planned: {args.rounds}  wall: {wall:.0f} s")
    for event in events:
        print(f"  {event}")
    print(f"failure lines in metrics.jsonl: {len(failures)}")
    bounded = True
    for name, series in sorted(samples.items()):
        if len(series) < 3:
            continue
        third = max(1, len(series) // 3)
        early, late = max(r for _, r in series[:third]), max(r for _, r in series[-third:])
        peak = max(r for _, r in series)
        ok = late <= early * (1 + args.growth)
        bounded &= ok
        print(f"  {name}: peak {peak / 2**20:.0f} MiB, early {early / 2**20:.0f}, late {late / 2**20:.0f}")
    print(f"memory_bounded: {bounded}")
    print(f"soak_rounds_completed: {len(completed)}/{args.rounds}")


if __name__ == "__main__":
    main()
