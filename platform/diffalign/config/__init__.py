"""Typed run configuration: YAML -> dataclasses (`schema`), loaded with overrides (`load`), checked
before any worker starts (`validate`). Errors name the field and the allowed values.

The config sits low in the package: it imports only the objectives, the timestep and reference
names, the precision names and the spec parsers, never the data, training, evaluation or Ray layers.
"""

from diffalign.config.load import apply_overrides, config_from_dict, copy_dict, load_config, save_config
from diffalign.config.schema import (
    BuildConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    GuardConfig,
    ModelConfig,
    ObjectiveConfig,
    OnlineConfig,
    OptimConfig,
    RayConfig,
    ReferenceConfig,
    RunConfig,
    SamplerPoolConfig,
    TimestepConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
)
from diffalign.config.validate import validate

__all__ = [
    "BuildConfig", "ConfigError", "DataConfig", "EvalConfig", "GuardConfig", "ModelConfig", "ObjectiveConfig",
    "OnlineConfig", "OptimConfig", "RayConfig", "ReferenceConfig", "RunConfig", "SamplerPoolConfig",
    "TimestepConfig", "TrackingConfig", "TrainConfig", "TuneConfig", "apply_overrides", "config_from_dict",
    "copy_dict", "load_config", "save_config", "validate",
]
