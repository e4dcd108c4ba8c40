"""Warm node workers under a real SuperLink and SuperNodes: same adapter as the simulation, bit for bit.

Two SuperNodes on loopback, each with a ``fedtune node`` worker named in its node config;
``flwr run`` trains two rounds of the tiny config. Every message is worked by a worker (none
by a ``flwr-clientapp`` process itself), and the final adapter equals the one ``fedtune
run`` trains from the same config in Flower's simulation runtime.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from fedtune.config import load_config
from fedtune.launch import run
from loopback import LoopbackDeployment
from node_workers import NodeWorkers

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERRIDES = ["partition.num_partitions=2", "fed.rounds=2", "train.num_threads=1", "run.report=false"]


def test_workers_serve_every_message_and_train_what_the_simulation_trains(tmp_path: Path) -> None:
    # Prepare: the simulation's adapter, then a deployment whose nodes have warm workers
    cfg = load_config("configs/tiny.toml", [*OVERRIDES, f"run.output_dir='{tmp_path / 'sim'}'"])
    simulated = load_file(str(run(cfg, progress=False).path / "final" / "adapter_model.safetensors"))
    out_dir = tmp_path / "runs"
    workers = NodeWorkers(tmp_path / "w", 2, config="configs/tiny.toml", overrides=OVERRIDES)

    # Execute
    with workers, LoopbackDeployment(tmp_path, 2, node_config=workers.node_config()) as deployment:
        env = deployment.connect("deployment", default=True)
        overrides = " ".join([*OVERRIDES, f"run.output_dir={out_dir}"])
        run_config = f"config-file='configs/tiny.toml' overrides='{overrides}'"
        cli = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "deployment", "--stream", "--run-config", run_config],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        logs = [workers.log(i) for i in range(2)]
        context = f"exit {cli.returncode}\n{cli.stdout[-2000:]}\n{deployment.diagnostics()}\n{logs}"

    # Assert: discovery, round 0's evaluation and two rounds of train + evaluate, all by the workers
    (final,) = out_dir.glob("*/final/adapter_model.safetensors")
    for log in logs:
        assert log.count("query message of run") == 1, context
        assert log.count("train message of run") == 2, context
        assert log.count("evaluate message of run") == 3, context
    deployed = load_file(str(final))
    assert deployed.keys() == simulated.keys()
    assert all((deployed[k] == simulated[k]).all() for k in deployed), "worker adapter differs"
