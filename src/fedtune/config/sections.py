"""The one typed config tree: :class:`Config` and its sections.

Every section is a frozen pydantic model with ``extra="forbid"``, so a misspelt key or a
non-positive size is reported with its dotted path (``model.lora.r``), and a section is
hashable (caches key on it). Every field carries its description, from which
``docs/configuration.md`` is generated (:mod:`fedtune.config_reference`).
"""

from __future__ import annotations

from typing import Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedtune.config.placement import DeviceMap, check_device_map
from fedtune.config.privacy import PrivacyConfig
from fedtune.config.rag import RagConfig
from fedtune.config.split import SplitConfig

# learning-rate curves: train.scheduler (transformers' names) and fed.lr_schedule
Schedule = Literal["constant", "linear", "cosine"]


class _Section(BaseModel):
    """A config section: unknown keys refused; frozen, so a section is hashable and can key a cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """``data``: where the examples come from and how they become token sequences."""

    source: str = Field(
        "chatterbot",
        description="'chatterbot' (built-in, offline), a .json/.jsonl/.csv/.parquet file or a datasets name",
    )
    format: str = Field(
        "openai",
        description="record format: alpaca, dolly, chatglm, sharegpt, openai or explanation "
        "(ignored for built-in corpora)",
    )
    split: str = Field("train", description="split to load when the source is a datasets hub name")
    template: str = Field(
        "chat", description="'chat' (the tokenizer's own chat template), 'alpaca', 'chatglm2' or 'llama2'"
    )
    max_source_length: int = Field(
        256, gt=0, description="prompt tokens kept (all before the final answer), cut from the left"
    )
    max_target_length: int = Field(
        128, gt=0, description="final-answer tokens kept, cut from the right (EOS appended and labelled)"
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of each client's examples held out for evaluation"
    )
    max_train_examples: int | None = Field(
        None, gt=0, description="cap on each client's training examples, after the held-out split"
    )
    max_test_examples: int | None = Field(None, gt=0, description="cap on each client's held-out examples")


class PartitionConfig(_Section):
    """``partition``: how the examples are divided among the clients."""

    name: str = Field(
        "category",
        description="partitioner: iid, dirichlet, category (a client per largest value of column) or shards",
    )
    num_partitions: int = Field(8, gt=0, description="number of clients (one partition each)")
    column: str = Field(
        "category", description="column partitioned by (not iid); converted records carry 'category'"
    )
    alpha: float = Field(0.5, gt=0, description="dirichlet: concentration; small values give skewed clients")
    min_partition_size: int = Field(2, gt=0, description="dirichlet: fewest examples any client may receive")
    shards_per_client: int = Field(
        2, gt=0, description="shards: how many shards of the column-sorted data each client is dealt"
    )


class RopeScalingConfig(_Section):
    """``model.rope_scaling``: transformers' RoPE scaling, applied wherever the model is loaded."""

    type: Literal["linear", "dynamic"] = Field(description="transformers' RoPE scaling type")
    factor: float = Field(gt=0, description="scale factor of the positions, e.g. 2.0")


class LoraConfig(_Section):
    """``model.lora``: the LoRA adapter's rank, scaling and targets; per-client and personal ranks."""

    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: int = Field(16, gt=0, description="LoRA alpha: the update B A is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA branch's input")
    target_modules: Literal["auto", "all-linear"] | tuple[str, ...] = Field(
        "auto",
        description="modules that get an adapter: 'auto' (every linear layer of each attention block: "
        "q/k/v/o on Llama, qkv_proj/o_proj on Phi-3, c_attn/c_proj on GPT-2...), 'all-linear' (also "
        "the MLPs) or a list of module names, checked against the model (see docs/models.md)",
    )
    personal_r: int | None = Field(
        None, gt=0, description="fflora: rank of the personal adapter (unset: model.lora.r)"
    )
    ranks: tuple[int, ...] | str | None = Field(
        None,
        description="per-client ranks for the stack and zero-pad strategies: a list, "
        "'flora' (64,32,16,16,8,8,4,4,4,4) or 'uniform:R' (unset: model.lora.r for all)",
    )
    freeze_a: bool = Field(
        False,
        description="FFA-LoRA: A stays at its seeded random start, only B is trained and sent (half the "
        "bytes, and half the dimensions DP noise lands on)",
    )


class QuantizationConfig(_Section):
    """``model.quantization``: the base quantised on load (bitsandbytes), LoRA trained on top."""

    bits: Literal[4, 8] = Field(description="4 (kind nf4 or fp4) or 8 (kind int8)")
    kind: Literal["nf4", "fp4", "int8"] | None = Field(
        None, description="nf4 (4-bit NormalFloat), fp4 or int8 (unset: nf4 for 4 bits, int8 for 8)"
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="4-bit: dtype the dequantised weights are multiplied in"
    )
    double_quant: bool = Field(False, description="4-bit: quantise the blocks' scales too (QLoRA's)")

    @model_validator(mode="after")
    def _kind_fits_bits(self) -> QuantizationConfig:
        if self.kind is None:
            self.__dict__["kind"] = "nf4" if self.bits == 4 else "int8"
        elif (self.bits == 8) != (self.kind == "int8"):
            raise ValueError(f"kind {self.kind!r} is not a {self.bits}-bit quantisation")
        return self


class ModelConfig(_Section):
    """``model``: the base model, its dtype and RoPE scaling, and the LoRA adapter trained on it."""

    name: str = Field(
        "smollm2",
        description="'smollm2', 'tiny-llama' (2 random layers), 'tiny-llama-4l' (4), "
        "any causal LM's hub id (offline: from the local cache) or a local folder",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the base model is loaded in"
    )
    trust_remote_code: bool = Field(False, description="let transformers run a hub model's own code (opt-in)")
    rope_scaling: RopeScalingConfig | None = Field(
        None,
        description="RoPE scaling, applied wherever the model is loaded (training, evaluation, chat), "
        "so a run is served with the scaling it was trained with; e.g. "
        '`rope_scaling = {type = "linear", factor = 2.0}`.',
    )
    quantization: QuantizationConfig | None = Field(
        None,
        description='quantise the base on load, e.g. `quantization = {bits = 4, kind = "nf4"}` '
        "(bitsandbytes); only the LoRA adapter trains and travels; eval and chat load it the same way",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="where the model runs: 'auto' (a CUDA GPU when there is one, else the CPU), "
        "'cpu', 'cuda' or 'cuda:N'",
    )
    device_map: DeviceMap | None = Field(
        None,
        description="spread the model over devices with accelerate (a model too big for one GPU): "
        "'auto' (or 'balanced', 'balanced_low_0', 'sequential') or {module = device}, e.g. "
        "{\"model.embed_tokens\" = 0, \"model.layers\" = 1, ...}; devices 'cpu', 'cuda:N' or N; "
        "replaces model.device (see docs/models.md)",
    )
    lora: LoraConfig = Field(
        default_factory=LoraConfig,
        description="The LoRA adapter: rank, scaling, dropout, target modules; per-client ranks; "
        "FF-LoRA's personal rank.",
    )

    @model_validator(mode="after")
    def _one_placement(self) -> ModelConfig:
        check_device_map(self.device, self.device_map)
        return self

    def __hash__(self) -> int:  # a device_map dict is unhashable; the client's model cache keys on this
        return hash(self.model_dump_json())


class TrainConfig(_Section):
    """``train``: a client's local training in one round (steps or epochs, batches, optimizer, lr)."""

    max_steps: int | None = Field(
        None, gt=0, description="optimizer steps per round; set this or epochs (neither: 10 steps)"
    )
    epochs: float | None = Field(None, gt=0, description="local epochs per round, instead of max_steps")
    batch_size: int = Field(4, gt=0, description="examples per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    eval_batch_size: int = Field(8, gt=0, description="examples per batch when computing held-out loss")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="sgd for SCAFFOLD's assumptions")
    lr: float = Field(2e-4, gt=0, description="clients' learning rate (the peak when a schedule decays it)")
    weight_decay: float = Field(0.0, ge=0, description="optimizer weight decay")
    scheduler: Schedule = Field(
        "constant", description="lr over a round's local steps (transformers' schedulers)"
    )
    warmup_steps: int = Field(0, ge=0, description="scheduler warm-up steps at the start of each round")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip the gradient norm before each step (unset: no clipping)"
    )
    num_threads: int | None = Field(
        None, gt=0, description="torch threads per client process (unset: torch's default)"
    )

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set only one of train.max_steps and train.epochs")
        if self.max_steps is None and self.epochs is None:
            self.__dict__["max_steps"] = 10
        return self


class FedConfig(_Section):
    """``fed``: the rounds, the strategy and its server optimizer, sampling, update checks."""

    rounds: int = Field(3, gt=0, description="federated rounds")
    strategy: str = Field(
        "fedavg",
        description="fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, scaffold, median, "
        "trimmed-mean, krum, stack, zero-pad or fflora",
    )
    fraction_train: float = Field(
        1.0, gt=0, le=1, description="clients sampled to train each round: floor(fraction x clients)"
    )
    fraction_evaluate: float = Field(
        1.0, ge=0, le=1, description="clients sampled to evaluate each round (0: no evaluation)"
    )
    min_train_clients: int = Field(1, gt=0, description="fewest clients sampled to train in a round")
    min_evaluate_clients: int = Field(1, ge=0, description="fewest clients sampled to evaluate in a round")
    min_available_clients: int | None = Field(
        None, gt=0, description="clients the server waits for (unset: partition.num_partitions)"
    )
    wire_dtype: Literal["float16", "float32", "int8", "nf4"] = Field(
        "float16",
        description="adapters on the wire: float16 (half of float32's bytes), float32, int8 (blockwise "
        "absmax, 8 bits) or nf4 (4-bit NormalFloat); int8/nf4 replies carry the update trained - sent",
    )
    wire_block: int = Field(64, ge=1, le=65536, description="int8/nf4: values per block sharing one scale")
    error_feedback: bool = Field(
        False,
        description="int8/nf4: each client adds its last update's rounding error to the next update "
        "(kept in its state dir)",
    )
    stack_mode: Literal["merge", "svd"] = Field(
        "merge", description="stack: merge into base + fresh adapters (FLoRA), or SVD back to each rank"
    )
    lr_schedule: Schedule = Field(
        "constant",
        description="clients' train.lr across rounds: round t of R trains at a scheduler's value at "
        "step t-1 of R, decaying towards lr_min_ratio x lr",
    )
    lr_min_ratio: float = Field(0.0, ge=0, le=1, description="lr_schedule's floor, a fraction of train.lr")
    # server optimisers (fedavgm, fedadam, fedyogi, fedadagrad) and FedProx
    server_lr: float | None = Field(None, gt=0, description="server step size (unset: Flower's default)")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="fedavgm momentum")
    beta_1: float | None = Field(
        None, ge=0, lt=1, description="fedadam/fedyogi: first-moment decay (unset: Flower's default)"
    )
    beta_2: float | None = Field(
        None, ge=0, lt=1, description="fedadam/fedyogi: second-moment decay (unset: Flower's default)"
    )
    tau: float | None = Field(
        None, gt=0, description="adaptivity (epsilon) of fedadam/yogi/adagrad (unset: Flower's default)"
    )
    proximal_mu: float = Field(0.0, ge=0, description="fedprox proximal term weight")
    # update checks and robust aggregation
    outlier_norm_factor: float | None = Field(
        None, gt=0, description="reject updates whose norm exceeds this x the median of the others"
    )
    clip_norm: float | None = Field(None, gt=0, description="clip each update's norm (distance to global)")
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed-mean: share of the values cut at each end, per coordinate"
    )
    krum_malicious: int = Field(0, ge=0, description="Krum: assumed number of malicious clients")
    evaluate_before: bool = Field(True, description="evaluate the starting adapter as round 0")
    timeout: float = Field(3600, gt=0, description="seconds to wait for client replies")
    # failures: deadlines, quorum and retries (docs/deployment.md, "When clients fail")
    round_timeout: float | None = Field(
        None,
        gt=0,
        description="seconds a train or evaluate phase waits for replies (unset: fed.timeout)",
    )
    wait_timeout: float = Field(
        300,
        gt=0,
        description="seconds to wait for the clients to connect, then for each to answer who it is "
        "(a node that does not is left out; too few nodes and the run is refused)",
    )
    min_train_replies: int = Field(
        1, gt=0, description="quorum: fewest good train replies a round completes on"
    )
    min_train_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="quorum: fewest good train replies as a share of the sampled clients "
        "(the quorum is the larger of this and min_train_replies)",
    )
    round_retries: int = Field(
        0,
        ge=0,
        description="train phases retried, freshly sampled, when a round falls below its quorum "
        "(not with privacy.dp)",
    )


class SimulationConfig(_Section):
    """``simulation``: Flower's simulation runtime as ``fedtune run`` starts it (nodes, cores)."""

    num_supernodes: int | None = Field(
        None, gt=0, description="simulated SuperNodes (unset: partition.num_partitions)"
    )
    cpus_per_client: float | None = Field(
        None,
        gt=0,
        description="cores per client (unset: all cores, so clients take turns; in split client-batch "
        "and hierarchical modes cores / clients, so they run at once)",
    )
    num_cpus: int | None = Field(None, gt=0, description="cores Ray may use (unset: all)")
    gpus_per_client: float = Field(
        0.0,
        ge=0,
        description="GPUs per simulated client (Flower's fractional resources: 0.25 lets four "
        "clients share one GPU; 0: clients use no GPU)",
    )


class RunSection(_Section):
    """``run``: where the run directory is written and whether a report goes in it."""

    output_dir: str = Field("runs", description="folder the run directories are made in")
    name: str = Field("fedtune", description="run directory name: NAME-YYYYmmdd-HHMMSS")
    report: bool = Field(True, description="write plots and report/index.html when the run ends")


class Config(_Section):
    """A whole fedtune config: the seed and one section per concern; ``to_toml`` writes it back."""

    seed: int = Field(
        0, description="seed of the held-out split, partitions, adapter start, client sampling and batches"
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="Where the examples come from and how they become training sequences: the source "
        "and its record format, the prompt template, truncation, each client's held-out split.",
    )
    partition: PartitionConfig = Field(
        default_factory=PartitionConfig, description="How the examples are divided among the clients."
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="The base model (which one, its dtype, RoPE scaling) and the LoRA adapter trained on it.",
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig,
        description="Each client's local training within a round: steps or epochs, batches, optimizer, "
        "learning rate.",
    )
    fed: FedConfig = Field(
        default_factory=FedConfig,
        description="The federated rounds: strategy, client sampling, the clients' lr across rounds, "
        "server optimizers, update checks and robust aggregation.",
    )
    simulation: SimulationConfig = Field(
        default_factory=SimulationConfig,
        description="Flower's simulation runtime, as `fedtune run` starts it: nodes and their cores.",
    )
    split: SplitConfig = Field(
        default_factory=SplitConfig,
        description="Split federated learning: each client runs the embeddings, the first and last "
        "blocks and the head; the server runs the middle blocks (the trunk) as a gRPC service.",
    )
    rag: RagConfig = Field(
        default_factory=RagConfig,
        description="Retrieval-augmented tuning (FF-RAG): passages from the client's private case base and "
        "a shared reference base go into each example's source.",
    )
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig,
        description="Privacy: client-level differential privacy with ε accounting, DP-SGD on clients, "
        "secure aggregation (SecAgg+).",
    )
    run: RunSection = Field(
        default_factory=RunSection, description="Where the run directory is written and what goes in it."
    )

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))
