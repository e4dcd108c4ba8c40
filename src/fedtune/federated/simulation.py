"""Start Flower's simulation runtime for a config and run directory (``fedtune run``, ``fedtune kb ask``)."""

from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING

from fedtune.config import Config
from fedtune.rundir import RunDir

if TYPE_CHECKING:
    from flwr.app import ConfigRecordValues
    from flwr.serverapp import ServerApp

log = logging.getLogger(__name__)


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
        "init_args": {"num_cpus": cores, "include_dashboard": False},
    }


def simulate(cfg: Config, run: RunDir, *, progress: bool = True) -> None:
    """Run the federation in Flower's simulation runtime (Ray workers on this machine)."""
    from fedtune.federated.server_app import make_server_app

    run_server_app(cfg, make_server_app(cfg, run, progress=progress))


def run_server_app(cfg: Config, server_app: ServerApp) -> None:
    """Run ``server_app`` against fedtune's ClientApp on the config's simulated SuperNodes."""
    from flwr.simulation import run_simulation

    from fedtune.federated.client_app import app as client_app

    num_supernodes = cfg.simulation.num_supernodes or cfg.partition.num_partitions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_config=backend_config(cfg),
        )
