"""The simulation's Ray resources: cores and GPUs per client."""

from __future__ import annotations

from fedtune.config import Config
from fedtune.federated.simulation import backend_config


def test_gpus_per_client_reach_flowers_client_resources() -> None:
    sim = {"num_cpus": 4, "cpus_per_client": 1, "gpus_per_client": 0.25}
    cfg = Config.model_validate({"simulation": sim})
    # a quarter GPU each: four simulated clients share one GPU
    assert backend_config(cfg)["client_resources"] == {"num_cpus": 1, "num_gpus": 0.25}


def test_clients_use_no_gpu_by_default() -> None:
    cfg = Config.model_validate({"simulation": {"num_cpus": 2}})
    assert backend_config(cfg)["client_resources"] == {"num_cpus": 2, "num_gpus": 0.0}
