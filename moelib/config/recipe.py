"""A run as the recipe's YAML describes it: the data section and the four sections read together."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelib.config.fields import _from_dict, _optional_str
from moelib.config.model import ModelConfig
from moelib.config.parallel import ParallelConfig
from moelib.config.training import TrainConfig
from moelib.errors import ConfigError


@dataclass
class DataConfig:
    """Where the tokens come from. ``data_path`` None: the embedded default corpus."""

    data_path: str | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        _optional_str(self, "data_path", "tokenizer")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        return _from_dict(cls, data)


@dataclass
class RecipeConfig:
    """A run as the recipe's YAML files describe it: sections model / train / parallel / data, whose keys
    are the dataclasses' field names. ``model`` may name a preset (``preset: tiny``) plus overrides; an
    empty ``parallel`` means "choose a layout for the world size". The optional ``schedule`` section
    overrides fields of the token-driven ScheduleConfig the recipe derives from ``train``
    (moelib.train.schedules.schedule_for_run); it is checked there."""

    model: ModelConfig
    train: TrainConfig
    parallel: ParallelConfig | None
    data: DataConfig
    schedule: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> RecipeConfig:
        """Load ``path``; ``overrides`` (section -> field -> value, e.g. from command-line flags) win."""
        import yaml

        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, train, parallel, data)")
        known = ("model", "train", "parallel", "data", "schedule")
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"{path}: unknown section {unknown[0]!r} (known: {', '.join(known)})")
        sections = {k: dict(raw.get(k) or {}) for k in known}
        for section, values in (overrides or {}).items():
            sections[section].update({k: v for k, v in values.items() if v is not None})
        model = dict(sections["model"])
        preset = model.pop("preset", None)
        model_cfg = ModelConfig.from_preset(preset, **model) if preset else ModelConfig.from_dict(model)
        par = ParallelConfig.from_dict(sections["parallel"]) if sections["parallel"] else None
        return cls(model_cfg, TrainConfig.from_dict(sections["train"]), par,
                   DataConfig.from_dict(sections["data"]), sections["schedule"])
