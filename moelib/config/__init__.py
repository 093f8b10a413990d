"""Configuration dataclasses, presets and validation.

Field names follow the Hugging Face DeepSeek-V3 config.json where one exists, so YAML files, the
checkpoint manifest and config.json speak the same language. Every rule a config can break is checked
in ``validate()`` and reported as one sentence naming the field.
"""

from moelib.config.model import TOPK_METHODS, ModelConfig, YarnConfig
from moelib.config.parallel import PIPELINE_SCHEDULES, ParallelConfig
from moelib.config.presets import PRESETS
from moelib.config.recipe import DataConfig, RecipeConfig
from moelib.config.training import PRECISION_BACKENDS, PrecisionConfig, TrainConfig

__all__ = [
    "ModelConfig", "YarnConfig", "TOPK_METHODS", "PRESETS",
    "PrecisionConfig", "PRECISION_BACKENDS", "TrainConfig",
    "ParallelConfig", "PIPELINE_SCHEDULES",
    "DataConfig", "RecipeConfig",
]
