"""The one typed config tree: TOML file + dotted overrides -> :class:`Config`.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key or a
non-positive size is reported with its dotted path (``model.lora.r``) and the file.
Flower's flat ``run_config`` is parsed here too (:func:`config_from_run_config`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedtune.errors import FedtuneError

# learning-rate curves: train.scheduler (transformers' names) and fed.lr_schedule
Schedule = Literal["constant", "linear", "cosine"]


class _Section(BaseModel):
    """A config section: unknown keys refused; frozen, so a section is hashable and can key a cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    source: str = Field("chatterbot", description="built-in corpus name, local file, or datasets name")
    format: str = Field("openai", description="record format (ignored for built-in corpora)")
    split: str = "train"
    template: str = Field("chat", description="'chat' (tokenizer's template) or a named template")
    max_source_length: int = Field(256, gt=0, description="prompt tokens kept, cut from the left")
    max_target_length: int = Field(128, gt=0, description="response tokens kept, cut from the right")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="per-client held-out share")
    max_train_examples: int | None = Field(None, gt=0, description="cap per client (after the split)")
    max_test_examples: int | None = Field(None, gt=0, description="cap per client held-out set")


class PartitionConfig(_Section):
    name: str = Field("category", description="iid | dirichlet | category | shards")
    num_partitions: int = Field(8, gt=0, description="number of clients")
    column: str = "category"
    alpha: float = Field(0.5, gt=0)
    min_partition_size: int = Field(2, gt=0)
    shards_per_client: int = Field(2, gt=0)


class RopeScalingConfig(_Section):
    type: Literal["linear", "dynamic"]
    factor: float = Field(gt=0)


class LoraConfig(_Section):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    personal_r: int | None = Field(None, gt=0, description="fflora: rank of the personal adapter (default r)")
    ranks: tuple[int, ...] | str | None = Field(
        None, description="per-client ranks: a list, 'flora' (64,32,16,16,8,8,4,4,4,4) or 'uniform:R'"
    )


class ModelConfig(_Section):
    name: str = Field("smollm2", description="'smollm2', 'tiny-llama', a hub id, or a local folder")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    rope_scaling: RopeScalingConfig | None = None
    lora: LoraConfig = Field(default_factory=LoraConfig)


class TrainConfig(_Section):
    max_steps: int | None = Field(None, gt=0, description="optimizer steps per round (default 10)")
    epochs: float | None = Field(None, gt=0, description="local epochs per round")
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    eval_batch_size: int = Field(8, gt=0)
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="sgd for SCAFFOLD's assumptions")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Schedule = Field("constant", description="lr over a round's local steps")
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    num_threads: int | None = Field(None, gt=0, description="torch threads per client process")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set only one of train.max_steps and train.epochs")
        if self.max_steps is None and self.epochs is None:
            self.__dict__["max_steps"] = 10
        return self


class FedConfig(_Section):
    rounds: int = Field(3, gt=0)
    strategy: str = "fedavg"
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    min_train_clients: int = Field(1, gt=0)
    min_evaluate_clients: int = Field(1, ge=0)
    min_available_clients: int | None = Field(None, gt=0, description="default: partition.num_partitions")
    wire_dtype: Literal["float16", "float32"] = "float16"
    stack_mode: Literal["merge", "svd"] = Field(
        "merge", description="stack: merge into base + fresh adapters (FLoRA), or SVD back to each rank"
    )
    lr_schedule: Schedule = Field(
        "constant", description="clients' train.lr over the rounds (decays towards lr_min_ratio x lr)"
    )
    lr_min_ratio: float = Field(0.0, ge=0, le=1, description="lr_schedule's floor, a fraction of train.lr")
    # server optimisers (fedavgm, fedadam, fedyogi, fedadagrad) and FedProx
    server_lr: float | None = Field(None, gt=0, description="server step size (default: Flower's)")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="fedavgm momentum")
    beta_1: float | None = Field(None, ge=0, lt=1)
    beta_2: float | None = Field(None, ge=0, lt=1)
    tau: float | None = Field(None, gt=0, description="adaptivity (epsilon) of fedadam/yogi/adagrad")
    proximal_mu: float = Field(0.0, ge=0, description="fedprox proximal term weight")
    # update checks and robust aggregation
    outlier_norm_factor: float | None = Field(
        None, gt=0, description="reject updates whose norm exceeds this x the median of the others"
    )
    clip_norm: float | None = Field(None, gt=0, description="clip each update's norm (distance to global)")
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="trimmed-mean cut per side")
    krum_malicious: int = Field(0, ge=0, description="Krum: assumed number of malicious clients")
    evaluate_before: bool = Field(True, description="evaluate the starting adapter as round 0")
    timeout: float = Field(3600, gt=0, description="seconds to wait for client replies")


class SimulationConfig(_Section):
    num_supernodes: int | None = Field(None, gt=0, description="default: partition.num_partitions")
    cpus_per_client: float | None = Field(None, gt=0, description="default: all cores (clients in turn)")
    num_cpus: int | None = Field(None, gt=0, description="cores Ray may use (default: all)")


class SplitProtectConfig(_Section):
    activation_sigma: float = Field(0.0, ge=0, description="noise on outgoing h1, relative to sample RMS")
    grad_clip_norm: float | None = Field(None, gt=0, description="per-sample L2 bound on dL/dh2 sent back")
    grad_noise_multiplier: float = Field(0.0, ge=0, description="noise std on dL/dh2, times the bound")
    activation_scale: Literal["sample", "token", "token_mad", "channel", "channel_mad"] = Field(
        "sample", description="what activation_sigma is relative to (see split/protect.py)"
    )

    @model_validator(mode="after")
    def _noise_needs_clip(self) -> SplitProtectConfig:
        if self.grad_noise_multiplier > 0 and self.grad_clip_norm is None:
            raise ValueError("split.protect.grad_noise_multiplier needs split.protect.grad_clip_norm")
        return self


class SplitConfig(_Section):
    enabled: bool = Field(False, description="split learning: clients hold head + tail, the server the trunk")
    n_head: int = Field(2, ge=1, le=5, description="blocks the client runs before the trunk")
    n_tail: int = Field(2, ge=1, le=5, description="blocks the client runs after the trunk")
    mode: Literal["sequential", "client-batch", "hierarchical"] = "sequential"
    groups: int = Field(1, ge=1, description="hierarchical: trunk replicas, each serving a group of clients")
    batch_wait_s: float = Field(
        1.0, gt=0, description="client-batch: longest wait for the other clients' activations"
    )
    trunk_lr: float | None = Field(None, gt=0, description="trunk optimiser lr (default train.lr)")
    host: str = Field("127.0.0.1", description="address the ServerApp's trunk service binds")
    port: int = Field(0, ge=0, le=65535, description="first port (replica g on port + g); 0: any free")
    public_host: str | None = Field(None, description="host clients dial (default: host)")
    tls_cert: str | None = Field(None, description="PEM certificate chain of the trunk service")
    tls_key: str | None = Field(None, description="PEM private key of the trunk service")
    tls_root_cert: str | None = Field(None, description="PEM root certificate clients trust")
    max_message_mib: float = Field(256.0, gt=0)
    timeout_s: float = Field(300.0, gt=0, description="longest wait for one trunk reply")
    protect: SplitProtectConfig = Field(default_factory=SplitProtectConfig)

    @model_validator(mode="after")
    def _consistent(self) -> SplitConfig:
        if self.groups > 1 and self.mode != "hierarchical":
            raise ValueError("split.groups > 1 needs split.mode = 'hierarchical'")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("split.tls_cert and split.tls_key go together")
        if self.tls_cert is not None and self.tls_root_cert is None:
            raise ValueError("split.tls_cert needs split.tls_root_cert (what clients trust)")
        return self


class RunSection(_Section):
    output_dir: str = "runs"
    name: str = "fedtune"
    report: bool = True


class Config(_Section):
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    fed: FedConfig = Field(default_factory=FedConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    run: RunSection = Field(default_factory=RunSection)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


def _parse_value(text: str) -> Any:
    """An override value is TOML (``5``, ``true``, ``[1, 2]``, ``"x"``) or else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_dotted(tree: dict[str, Any], key: str, value: Any, *, where: str = "--set") -> None:
    """Set ``a.b.c`` in a nested dict, creating tables on the way."""
    parts = key.split(".")
    if not all(parts):
        raise FedtuneError(f"{where}: bad key {key!r}")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FedtuneError(f"{where}: {key!r}: {part!r} is a value, not a table")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (``fed.rounds=5``) to a raw config dict; errors name the override."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise FedtuneError(f"--set {item}: expected KEY=VALUE, e.g. fed.rounds=5")
        set_dotted(tree, key.strip(), _parse_value(value.strip()), where=f"--set {item}")
    return tree


def _blame(loc: tuple[str, ...], overrides: Sequence[str], source: str) -> str:
    """Who set the value at ``loc``: the last ``--set`` of it or of a table above it (a later
    one replaces what an earlier one set), else ``source``, then naming the overrides inside
    ``loc`` (a check over a whole section may fail because of one of them)."""
    keys = [tuple(item.partition("=")[0].strip().split(".")) for item in overrides]
    setters = [item for key, item in zip(keys, overrides, strict=True) if loc[: len(key)] == key]
    if setters:
        return f"--set {setters[-1]}"
    inside = [f"--set {item}" for key, item in zip(keys, overrides, strict=True) if key[: len(loc)] == loc]
    return f"{source} with {', '.join(inside)}" if inside else source


def validate(tree: Mapping[str, Any], *, source: str, overrides: Sequence[str] = ()) -> Config:
    """Build a Config, turning pydantic's errors into one message naming each key.

    Each error names where its value came from: ``source`` (the config file), or the
    ``--set`` item of ``overrides`` (already applied to ``tree``) that set it.
    """
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = tuple(str(p) for p in e["loc"])
            lines.append(f"{_blame(loc, overrides, source)}: {'.'.join(loc) or '(top level)'}: {e['msg']}")
        raise FedtuneError("\n".join(lines)) from None


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        nested = isinstance(value, Mapping) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if nested else value
    return out


def read_toml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file; ``extends = "other.toml"`` (relative to it) is read first, then overridden."""
    path = Path(path)
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedtuneError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise FedtuneError(f"{path}: invalid TOML: {err}") from None
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise FedtuneError(f"{path}: extends: expected a file name")
    base_path = (path.parent / parent).resolve()
    if base_path in _seen:
        raise FedtuneError(f"{path}: extends: {parent} forms a cycle")
    return _merge(read_toml(base_path, (*_seen, base_path)), tree)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a TOML config (or the defaults) and apply dotted overrides."""
    tree = read_toml(path) if path is not None else {}
    apply_overrides(tree, overrides)
    return validate(tree, source=str(path) if path else "config", overrides=overrides)


def config_from_run_config(run_config: Mapping[str, Any], app_dir: str | Path = ".") -> Config:
    """Parse Flower's flat run_config: ``config-file`` plus dotted overrides of it."""
    tree: dict[str, Any] = {}
    config_file = run_config.get("config-file")
    if config_file:
        path = Path(str(config_file))
        if not path.is_absolute():
            path = Path(app_dir) / path
        tree = read_toml(path)
    for key, value in run_config.items():
        if key != "config-file":
            set_dotted(tree, str(key), value, where="run_config")
    return validate(tree, source="run_config")


def config_from_toml_text(text: str, *, source: str) -> Config:
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise FedtuneError(f"{source}: invalid TOML: {err}") from None
    return validate(tree, source=source)
