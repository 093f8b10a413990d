"""moelib: train DeepSeek-V3-style mixture-of-experts language models."""

from moelib.config import ModelConfig, PrecisionConfig, TrainConfig, YarnConfig
from moelib.errors import BackendUnavailableError, CheckpointError, ConfigError, DataError, MoelibError

__version__ = "0.1.0"


def load_model(path):
    """A CPU model in eval mode from a moelib checkpoint or an HF DeepSeek-V3 directory (moelib.convert)."""
    from moelib.convert import load_model as _load  # lazy: keeps `import moelib` free of the model code

    return _load(path)


__all__ = [
    "ModelConfig", "PrecisionConfig", "TrainConfig", "YarnConfig",
    "load_model",
    "MoelibError", "ConfigError", "DataError", "CheckpointError", "BackendUnavailableError",
]
