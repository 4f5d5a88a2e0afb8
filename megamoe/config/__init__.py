"""One typed config tree, loaded from YAML with dotted overrides and validated once (L0: stdlib + yaml)."""

from megamoe.config.loader import ConfigError, build, dump, from_dict, load, read_sections
from megamoe.config.tree import (
    MOE_CONFIGS,
    CartesianMoEConfig,
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    DynamicMoEConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    MPOEMoEConfig,
    ParallelConfig,
    PEERMoEConfig,
    RunConfig,
    TopKMoEConfig,
    TrainConfig,
)
from megamoe.config.validate import Environment, Layout, parse_data_path, validate

__all__ = ["MOE_CONFIGS", "CartesianMoEConfig", "CheckpointConfig", "ConfigError", "DataConfig", "DeepSpeedConfig",
           "DynamicMoEConfig", "Environment", "Layout", "LoggingConfig", "MPOEMoEConfig", "ModelConfig", "MoEConfig",
           "PEERMoEConfig", "ParallelConfig", "RunConfig", "TopKMoEConfig", "TrainConfig", "build", "dump", "from_dict",
           "load", "parse_data_path", "read_sections", "validate"]
