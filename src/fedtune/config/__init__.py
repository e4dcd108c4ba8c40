"""The one typed config tree (:mod:`.sections`) and how configs are read (:mod:`.load`).

TOML file + dotted overrides -> :class:`Config`; Flower's flat ``run_config`` is parsed in
:func:`config_from_run_config`.
"""

from fedtune.config.load import (
    apply_overrides,
    config_from_run_config,
    config_from_toml_text,
    load_config,
    read_toml,
    set_dotted,
    validate,
)
from fedtune.config.privacy import LocalDpConfig, PrivacyConfig, SecAggConfig
from fedtune.config.rag import RagConfig
from fedtune.config.sections import (
    Config,
    DataConfig,
    FedConfig,
    LoraConfig,
    ModelConfig,
    PartitionConfig,
    QuantizationConfig,
    RopeScalingConfig,
    RunSection,
    Schedule,
    SimulationConfig,
    TrainConfig,
)
from fedtune.config.split import SplitConfig, SplitProtectConfig

__all__ = [
    "Config",
    "DataConfig",
    "FedConfig",
    "LocalDpConfig",
    "LoraConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "QuantizationConfig",
    "RagConfig",
    "RopeScalingConfig",
    "RunSection",
    "Schedule",
    "SecAggConfig",
    "SimulationConfig",
    "SplitConfig",
    "SplitProtectConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_run_config",
    "config_from_toml_text",
    "load_config",
    "read_toml",
    "set_dotted",
    "validate",
]
