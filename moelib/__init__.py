"""moelib: train DeepSeek-V3-style mixture-of-experts language models."""

from moelib.config import ModelConfig, PrecisionConfig, TrainConfig, YarnConfig
from moelib.errors import BackendUnavailableError, CheckpointError, ConfigError, DataError, MoelibError

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "PrecisionConfig", "TrainConfig", "YarnConfig",
    "MoelibError", "ConfigError", "DataError", "CheckpointError", "BackendUnavailableError",
]
