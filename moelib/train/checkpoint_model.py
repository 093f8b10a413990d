"""Which model a run trains: its YAML's, or the one stored in the checkpoint it loads.

Continuing from a checkpoint (an imported one above all) should not need a hand-written YAML of the same
shape. As Megatron's ``--use-checkpoint-args``, the checkpoint's manifest then supplies the model config
while the training settings still come from the YAML and the flags.
"""

from __future__ import annotations

import dataclasses

from moelib.config import ModelConfig
from moelib.errors import CheckpointError, ConfigError
from moelib.train.checkpoint import MANIFEST, CheckpointReader


def checkpoint_model_config(load: str) -> ModelConfig:
    """The model config stored in the manifest of checkpoint ``load`` (a step directory or a --save root)."""
    reader = CheckpointReader(load)
    model = reader.manifest.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{reader.path / MANIFEST}: no 'model' config")
    return ModelConfig.from_dict(model)


def resolve_model_config(yaml_model: ModelConfig, config: str | None, load: str | None,
                         use_checkpoint_args: bool = False) -> ModelConfig:
    """The model config of a run: the checkpoint's when ``load`` is given without ``config`` (or with
    ``use_checkpoint_args``), else the YAML's, which must then equal the checkpoint's."""
    if use_checkpoint_args and not load:
        raise ConfigError("--use-checkpoint-args takes the model config from --load, which is not given")
    if not load:
        return yaml_model
    stored = checkpoint_model_config(load)
    if config is None or use_checkpoint_args:
        return stored
    if stored != yaml_model:
        field = next(f.name for f in dataclasses.fields(ModelConfig)
                     if getattr(stored, f.name) != getattr(yaml_model, f.name))
        raise ConfigError(f"{load}: the checkpoint's model config differs from --config {config} ({field} "
                          f"{getattr(stored, field)!r} there, {getattr(yaml_model, field)!r} here); leave out "
                          "--config or pass --use-checkpoint-args to train the checkpoint's model")
    return yaml_model
