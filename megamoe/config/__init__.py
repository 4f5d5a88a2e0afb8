"""One typed config tree, loaded from YAML with dotted overrides and validated once (L0: stdlib + yaml).

The moe: section's class depends on its variant: megamoe.variants holds each variant's config class.
"""

from megamoe.config.loader import ConfigError, build, dump, from_dict, load, read_sections
from megamoe.config.tree import (
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from megamoe.config.validate import Environment, Layout, data_split, parse_data_path, valid_sets, validate

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "data_split", "DeepSpeedConfig", "Environment", "Layout",
           "LoggingConfig", "ModelConfig", "MoEConfig", "ParallelConfig", "RunConfig", "TrainConfig", "build", "dump",
           "from_dict", "load", "parse_data_path", "read_sections", "valid_sets", "validate"]
