"""One typed config tree, loaded from YAML with dotted overrides and validated once (L0: stdlib + yaml)."""

from megamoe.config.loader import ConfigError, build, dump, load
from megamoe.config.tree import (
    MOE_CONFIGS,
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    RunConfig,
    TopKMoEConfig,
    TrainConfig,
)
from megamoe.config.validate import Environment, Layout, parse_data_path, validate

__all__ = [
    "MOE_CONFIGS",
    "MoEConfig",
    "TopKMoEConfig","CheckpointConfig", "ConfigError", "DataConfig", "DeepSpeedConfig", "Environment", "Layout",
           "LoggingConfig", "ModelConfig", "ParallelConfig", "RunConfig", "TrainConfig", "build", "dump", "load",
           "parse_data_path", "validate"]
