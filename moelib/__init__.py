"""moelib: train DeepSeek-V3-style mixture-of-experts language models."""

from moelib.config import ModelConfig, PrecisionConfig, TrainConfig, YarnConfig
from moelib.errors import BackendUnavailableError, CheckpointError, ConfigError, DataError, MoelibError

__version__ = "0.1.0"


def load_model(path, dtype="fp32"):
    """A CPU model in eval mode from a moelib checkpoint or an HF DeepSeek-V3 directory, its weights in
    ``dtype`` ("fp32", "bf16" or "fp8"); see moelib.inference.load."""
    from moelib.inference.load import load_model as _load  # lazy: keeps `import moelib` free of the model code

    return _load(path, dtype)


def generate(model, input_ids, max_new_tokens, **kwargs):
    """Generation(tokens, stats) from ``model``; see moelib.inference.generate.generate for the arguments."""
    from moelib.inference.generate import generate as _generate

    return _generate(model, input_ids, max_new_tokens, **kwargs)


__all__ = [
    "ModelConfig", "PrecisionConfig", "TrainConfig", "YarnConfig",
    "load_model", "generate",
    "MoelibError", "ConfigError", "DataError", "CheckpointError", "BackendUnavailableError",
]
