"""The simulation's Ray resources (cores and GPUs per client) and Ray's start."""

from __future__ import annotations

import os
import sys

import pytest

from fedtune.config import Config
from fedtune.errors import FedtuneError
from fedtune.federated import simulation
from fedtune.federated.simulation import backend_config


def test_gpus_per_client_reach_flowers_client_resources() -> None:
    sim = {"num_cpus": 4, "cpus_per_client": 1, "gpus_per_client": 0.25}
    cfg = Config.model_validate({"simulation": sim})
    # a quarter GPU each: four simulated clients share one GPU
    assert backend_config(cfg)["client_resources"] == {"num_cpus": 1, "num_gpus": 0.25}


def test_clients_use_no_gpu_by_default() -> None:
    cfg = Config.model_validate({"simulation": {"num_cpus": 2}})
    assert backend_config(cfg)["client_resources"] == {"num_cpus": 2, "num_gpus": 0.0}


class FakeRay:
    """``ray.init`` failing its first ``failures`` calls, as a GCS server too slow to start does."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.inits: list[dict] = []
        self.shutdowns = 0

    def is_initialized(self) -> bool:
        return False

    def init(self, **kwargs) -> None:
        self.inits.append(kwargs)
        if len(self.inits) <= self.failures:
            raise RuntimeError("Timed out waiting for file gcs_server_port")

    def shutdown(self) -> None:
        self.shutdowns += 1


def use_fake_ray(monkeypatch, failures: int) -> FakeRay:
    fake = FakeRay(failures)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(simulation, "RAY_RETRY_PAUSE_S", 0.0)
    monkeypatch.setenv("PYTHONPATH", "/extra")
    return fake


def test_a_failed_ray_start_is_retried_with_the_same_arguments(monkeypatch) -> None:
    fake = use_fake_ray(monkeypatch, failures=2)
    init_args = backend_config(Config.model_validate({"simulation": {"num_cpus": 2}}))["init_args"]
    simulation.start_ray(init_args, attempts=3)
    assert len(fake.inits) == 3 and fake.shutdowns == 2
    assert all(call == fake.inits[0] for call in fake.inits)
    assert fake.inits[0]["num_cpus"] == 2 and fake.inits[0]["include_dashboard"] is False
    # the workers import what the driver imports, and the extra path stays once
    path = fake.inits[0]["runtime_env"]["env_vars"]["PYTHONPATH"].split(os.pathsep)
    assert path.count("/extra") == 1 and sys.path[0] in path


def test_ray_failing_every_start_is_a_clear_error(monkeypatch) -> None:
    fake = use_fake_ray(monkeypatch, failures=5)
    with pytest.raises(FedtuneError, match=r"\(Ray\) failed to start 2 times; last: Timed out"):
        simulation.start_ray({"num_cpus": 1}, attempts=2)
    assert len(fake.inits) == 2 and fake.shutdowns == 2


def test_ray_is_shut_down_when_flowers_runtime_fails_before_its_backend(monkeypatch) -> None:
    import flwr.simulation

    fake = use_fake_ray(monkeypatch, failures=0)

    def failing_run(**kwargs) -> None:
        assert kwargs["backend_config"]["init_args"]["num_cpus"] == 1
        raise RuntimeError("the ClientApp failed to load")

    monkeypatch.setattr(flwr.simulation, "run_simulation", failing_run)
    cfg = Config.model_validate({"simulation": {"num_cpus": 1}})
    with pytest.raises(RuntimeError, match="failed to load"):
        simulation.run_server_app(cfg, server_app=None)  # type: ignore[arg-type]
    assert len(fake.inits) == 1 and fake.shutdowns == 1
