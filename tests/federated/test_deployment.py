"""`flwr run` of the app against a real SuperLink and two SuperNodes on loopback.

Everything runs as separate processes, as on separate machines: each has its own
FLWR_HOME (where Flower installs the FAB), the SuperNodes learn their partition from
``--node-config``, and the run config reaches the ServerApp through ``flwr run
--run-config``. The tiny config keeps the whole deployment to well under a minute on
two cores; most of it is Python start-up and imports, once per message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loopback import LoopbackDeployment

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEADLINE_S = 360.0  # the run itself takes ~30-60 s on 2 cores; slack for a loaded machine


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LoopbackDeployment]:
    """A SuperLink and two SuperNodes (partitions 0 and 1 of 2) on free loopback ports."""
    with LoopbackDeployment(tmp_path, num_nodes=2) as dep:
        yield dep


SPLIT = "model.name=tiny-llama-4l split.enabled=true split.n_head=1 split.n_tail=1"
# SecAgg+ across processes, with client-level DP's noise shared out among the clients
SECAGG = (
    "privacy.secagg.enabled=true privacy.dp=true privacy.noise=client privacy.noise_multiplier=1.0 "
    "privacy.sampling=fixed privacy.clip_norm=0.1"
)


@pytest.mark.parametrize("extra", ["", SPLIT, SECAGG], ids=["adapter", "split", "secagg-dp"])
def test_flwr_run_trains_one_round_across_two_supernodes(deployment: LoopbackDeployment, extra: str) -> None:
    # Prepare: the CLI's SuperLink connection, in its own FLWR_HOME. A split run's trunk service
    # runs in the ServerApp process; the ClientApp processes stream to it directly.
    env = deployment.connect("deployment", default=True)
    out_dir = deployment.root / "runs"
    overrides = f"partition.num_partitions=2 fed.rounds=1 fed.timeout=120 run.output_dir={out_dir} {extra}"

    # Execute: --stream follows the run's log until it ends
    cli = subprocess.run(
        [
            str(BIN / "flwr"),
            "run",
            str(REPO),
            "deployment",
            "--run-config",
            f"config-file='configs/tiny.toml' overrides='{overrides}'",
            "--stream",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S * (3 if extra == SECAGG else 1),  # SecAgg+: 3 more ClientApp starts a node
    )

    # Assert: one complete round and the final adapter in the run directory
    context = f"flwr run exited {cli.returncode}\n{cli.stdout[-3000:]}\n{cli.stderr[-3000:]}\n"
    context += deployment.diagnostics()
    runs = list(out_dir.glob("*/state.json"))
    assert len(runs) == 1, context
    run_dir = runs[0].parent
    assert json.loads(runs[0].read_text())["last_round"] == 1, context
    assert (run_dir / "final" / "adapter_model.safetensors").is_file(), context
    clients = {
        line["client"]
        for line in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if line["round"] == 1 and line["phase"] == "train"
    }
    assert clients == {0, 1}, context
    if extra == SECAGG:  # the round went through SecAgg+ and was accounted
        lines = list(map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()))
        (server,) = [x for x in lines if x["phase"] == "server" and x["round"] == 1]
        assert server["epsilon"] > 0 and server["num_clients"] == 2, context
        assert (run_dir / "final" / "privacy.json").is_file(), context
    if extra == SPLIT:  # activations crossed to the trunk service, and its adapter is in the checkpoint
        lines = list(map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()))
        assert all(x["trunk_bytes_up"] > 0 for x in lines if x["phase"] == "train"), context
        assert [x["trunk_passes"] for x in lines if x["phase"] == "server" and x["round"] == 1] == [4], (
            context
        )
