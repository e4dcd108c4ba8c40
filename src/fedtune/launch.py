"""``fedtune run``: check everything that can be checked, then create the run directory and simulate.

Bad input must never leave a half-written run directory, so the data (every
client's partition and held-out split, and one tokenized example each), the model
(config, tokenizer, LoRA targets), the template and the strategy are all checked
before the directory is made.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from fedtune.config import Config
from fedtune.data.pipeline import client_conversations, partitions
from fedtune.data.tokenize import tokenize_conversation
from fedtune.errors import FedtuneError
from fedtune.federated.strategies import check_strategy
from fedtune.models.adapters import initial_adapter_state
from fedtune.models.load import load_tokenizer
from fedtune.models.quantize import check_quantization
from fedtune.privacy.plan import check_privacy
from fedtune.rundir import RunDir
from fedtune.split.rounds import check_split

log = logging.getLogger(__name__)


def preflight(cfg: Config) -> None:
    """Raise FedtuneError for anything in ``cfg`` that would fail later in the run."""
    check_strategy(cfg)
    if (plan := check_privacy(cfg)) is not None:  # calibrates the noise: refuses a target it cannot meet
        log.info(
            "privacy: noise multiplier %.4g for ε=%s, δ=%.3g over %s rounds of %s of %s clients",
            plan.noise_multiplier,
            cfg.privacy.target_epsilon,
            plan.delta,
            cfg.fed.rounds,
            plan.cohort,
            plan.population,
        )
    if cfg.split.enabled:
        if cfg.model.device_map is not None:  # the split parts are placed by split learning itself
            raise FedtuneError("model.device_map: not with split.enabled (split learning places its parts)")
        check_split(cfg)
    check_quantization(cfg.model)  # the device and backend can quantise as asked
    tokenizer = load_tokenizer(cfg.model)
    initial_adapter_state(cfg.model, seed=cfg.seed)  # model config + LoRA targets, no weights
    parts = partitions(cfg)
    if cfg.fed.min_available_clients and cfg.fed.min_available_clients > len(parts):
        raise FedtuneError(
            f"fed.min_available_clients={cfg.fed.min_available_clients} exceeds the {len(parts)} partitions"
        )
    nodes, needed = cfg.simulation.num_supernodes, cfg.fed.min_available_clients or len(parts)
    if nodes is not None and nodes < needed:  # the server would wait for clients that never come
        key = "fed.min_available_clients" if cfg.fed.min_available_clients else "partition.num_partitions"
        raise FedtuneError(f"simulation.num_supernodes={nodes} is fewer than {key}={needed}")
    for pid in range(len(parts)):
        train, _ = client_conversations(cfg, pid)
        tokenize_conversation(
            train[0]["messages"],
            tokenizer,
            cfg.data.template,
            max_source_length=cfg.data.max_source_length,
            max_target_length=cfg.data.max_target_length,
        )


def run(cfg: Config | None = None, *, resume: str | Path | None = None, progress: bool = True) -> RunDir:
    """Start a new run from ``cfg``, or continue the run directory ``resume``."""
    from fedtune.federated.simulation import simulate
    from fedtune.report import write_report

    if resume is not None:
        run_dir = RunDir.open(resume)
        cfg = run_dir.resume_config()
        preflight(cfg)
        log.info("resuming %s after round %s", run_dir.path, run_dir.last_round())
    else:
        assert cfg is not None
        preflight(cfg)
        run_dir = RunDir.create(cfg)
    simulate(cfg, run_dir, progress=progress)
    if (failed := run_dir.failed()) is not None:
        if resume is None and run_dir.last_round() < 0:  # nothing ran: leave no run directory behind
            shutil.rmtree(run_dir.path)
            raise FedtuneError(f"the federation did not start: {failed}")
        raise FedtuneError(
            f"run FAILED after round {run_dir.last_round()} of {cfg.fed.rounds}: {failed}; "
            f"continue with: fedtune run --resume {run_dir.path}"
        )
    if (stopped := run_dir.stopped()) is not None:
        log.warning("%s: stopped after round %s: %s", run_dir.path, run_dir.last_round(), stopped)
    elif run_dir.last_round() < cfg.fed.rounds:
        raise FedtuneError(
            f"the federation stopped after round {run_dir.last_round()} of {cfg.fed.rounds}; "
            f"continue with: fedtune run --resume {run_dir.path}"
        )
    if cfg.run.report:
        write_report(run_dir.path)
    return run_dir
