"""``fedtune run``: check everything that can be checked, then create the run directory and simulate.

Bad input must never leave a half-written run directory, so the data (every
client's partition and held-out split, and one tokenized example each), the model
(config, tokenizer, LoRA targets), the template and the strategy are all checked
before the directory is made.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedtune.config import Config
from fedtune.data.pipeline import client_conversations, partitions
from fedtune.data.tokenize import tokenize_conversation
from fedtune.errors import FedtuneError
from fedtune.federated.strategies import strategy_class
from fedtune.models.adapters import initial_adapter_state
from fedtune.models.load import load_tokenizer
from fedtune.rundir import RunDir

log = logging.getLogger(__name__)


# strategies whose clients all get the same adapter: they carry over to split runs unchanged
SPLIT_STRATEGIES = (
    *("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"),
    *("median", "trimmed-mean", "krum"),
)


def preflight_split(cfg: Config) -> None:
    """A split run's strategy, model and cut make sense (no weights loaded)."""
    from fedtune.models.load import load_model_config
    from fedtune.split.partition_model import GPT2_FAMILY, LLAMA_FAMILY

    if cfg.fed.strategy not in SPLIT_STRATEGIES:
        raise FedtuneError(
            f"fed.strategy: {cfg.fed.strategy!r} does not apply to split runs (split.enabled); "
            f"use one of {', '.join(SPLIT_STRATEGIES)}"
        )
    if cfg.model.lora.ranks is not None:
        raise FedtuneError("model.lora.ranks: per-client ranks do not apply to split runs")
    config = load_model_config(cfg.model)
    if config.model_type not in LLAMA_FAMILY | GPT2_FAMILY:
        raise FedtuneError(
            f"model.name: split learning supports {sorted(LLAMA_FAMILY | GPT2_FAMILY)} models, "
            f"not {config.model_type!r}"
        )
    layers = int(config.num_hidden_layers)
    if cfg.split.n_head + cfg.split.n_tail >= layers:
        raise FedtuneError(
            f"split.n_head + split.n_tail: {cfg.split.n_head} + {cfg.split.n_tail} leaves no block "
            f"for the trunk of a {layers}-layer model"
        )
    for key in ("tls_cert", "tls_key", "tls_root_cert"):
        value = getattr(cfg.split, key)
        if value is not None and not Path(value).is_file():
            raise FedtuneError(f"split.{key}: {value} is not a file")


def preflight(cfg: Config) -> None:
    """Raise FedtuneError for anything in ``cfg`` that would fail later in the run."""
    strategy_class(cfg)
    if cfg.split.enabled:
        preflight_split(cfg)
    tokenizer = load_tokenizer(cfg.model)
    initial_adapter_state(cfg.model, seed=cfg.seed)  # model config + LoRA targets, no weights
    parts = partitions(cfg)
    if cfg.fed.min_available_clients and cfg.fed.min_available_clients > len(parts):
        raise FedtuneError(
            f"fed.min_available_clients={cfg.fed.min_available_clients} exceeds the {len(parts)} partitions"
        )
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
        cfg = run_dir.config()
        preflight(cfg)
        log.info("resuming %s after round %s", run_dir.path, run_dir.last_round())
    else:
        assert cfg is not None
        preflight(cfg)
        run_dir = RunDir.create(cfg)
    simulate(cfg, run_dir, progress=progress)
    if run_dir.last_round() < cfg.fed.rounds:
        raise FedtuneError(
            f"the federation stopped after round {run_dir.last_round()} of {cfg.fed.rounds}; "
            f"continue with: fedtune run --resume {run_dir.path}"
        )
    if cfg.run.report:
        write_report(run_dir.path)
    return run_dir
