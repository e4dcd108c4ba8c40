"""Start Flower's simulation runtime for a config and run directory (``fedtune run``, ``fedtune kb ask``)."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedtune.config import Config
from fedtune.errors import FedtuneError
from fedtune.rundir import RunDir

if TYPE_CHECKING:
    from flwr.app import ConfigRecordValues
    from flwr.serverapp import ServerApp

log = logging.getLogger(__name__)

# Ray's start waits 30 s (not configurable) for its GCS server to write its port file; on a
# loaded machine that can run out before any client exists, so a failed start is retried
RAY_START_ATTEMPTS = 3
RAY_RETRY_PAUSE_S = 2.0


def backend_config(cfg: Config) -> dict[str, dict[str, ConfigRecordValues]]:
    """Ray resources: by default one client at a time with every core (no oversubscription).

    Split runs in client-batch and hierarchical mode run every client at once by default: those
    modes exist to serve concurrent clients' steps together or side by side.
    """
    cores = cfg.simulation.num_cpus or os.cpu_count() or 1
    per_client = cfg.simulation.cpus_per_client or cores
    if cfg.split.enabled and cfg.split.mode != "sequential" and cfg.simulation.cpus_per_client is None:
        per_client = cores / (cfg.simulation.num_supernodes or cfg.partition.num_partitions)
    return {
        "client_resources": {"num_cpus": per_client, "num_gpus": cfg.simulation.gpus_per_client},
        # Flower's own defaults for logging, spelt out: fedtune starts Ray with these itself
        "init_args": {
            "num_cpus": cores,
            "include_dashboard": False,
            "logging_level": "WARNING",
            "log_to_driver": True,
        },
    }


def start_ray(init_args: Mapping[str, Any], attempts: int = RAY_START_ATTEMPTS) -> None:
    """Start Ray before Flower's runtime does, retrying a start whose processes do not come up.

    Flower starts Ray inside its runtime thread after the ServerApp's thread is running, so a
    failed start there leaves a ServerApp waiting for clients that never come. Started here
    first, nothing of the run exists yet; Flower's backend then finds Ray running, uses it and
    shuts it down at the end. Ray's workers get the driver's ``sys.path`` as Flower gives it.
    """
    import ray

    if ray.is_initialized():
        return
    paths = [*sys.path, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(filter(None, paths)))
    runtime_env = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}
    for attempt in range(1, attempts + 1):
        try:
            ray.init(runtime_env=runtime_env, **init_args)
            return
        except Exception as err:  # Ray raises several kinds when its own processes fail to start
            ray.shutdown()
            if attempt == attempts:
                raise FedtuneError(
                    f"the simulation runtime (Ray) failed to start {attempts} times; last: {err}"
                ) from err
            log.warning("Ray failed to start (%s); trying again (%d of %d)", err, attempt + 1, attempts)
            time.sleep(RAY_RETRY_PAUSE_S)


def simulate(cfg: Config, run: RunDir, *, progress: bool = True) -> None:
    """Run the federation in Flower's simulation runtime (Ray workers on this machine)."""
    from fedtune.federated.server_app import make_server_app

    run_server_app(cfg, make_server_app(cfg, run, progress=progress))


def run_server_app(cfg: Config, server_app: ServerApp) -> None:
    """Run ``server_app`` against fedtune's ClientApp on the config's simulated SuperNodes."""
    from flwr.simulation import run_simulation

    from fedtune.federated.client_app import app as client_app

    num_supernodes = cfg.simulation.num_supernodes or cfg.partition.num_partitions
    backend = backend_config(cfg)
    start_ray(backend["init_args"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_supernodes,
                backend_config=backend,
            )
    finally:  # Flower shuts Ray down once its backend exists; not when it failed before that
        import ray

        ray.shutdown()
