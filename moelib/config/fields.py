"""Field checks and dict reading shared by the config dataclasses.

Each check raises ConfigError with one sentence naming the class and field; ``_from_dict`` builds a dataclass
from a YAML/JSON mapping, refusing unknown keys and reading numbers PyYAML leaves as strings.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any

from moelib.errors import ConfigError


def _require(ok: bool, cls: str, name: str, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{cls}.{name}: {rule}")


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 type(cfg).__name__, name, f"must be a positive integer, got {value!r}")


def _number(cfg: Any, name: str, ok: typing.Callable[[float], bool], rule: str) -> None:
    """``name`` must be a finite int or float (not a bool) for which ``ok`` holds."""
    value = getattr(cfg, name)
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and ok(value),
             type(cfg).__name__, name, f"must be {rule}, got {value!r}")


def _optional_str(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        _require(value is None or isinstance(value, str), type(cfg).__name__, name,
                 f"must be a string (or absent), got {value!r}")


@functools.cache
def _field_types(cls) -> dict[str, set]:
    """Field name -> the set of types its annotation allows (``int | None`` -> {int, NoneType})."""
    return {name: set(typing.get_args(hint)) or {hint} for name, hint in typing.get_type_hints(cls).items()}


def _coerce(cls, name: str, value: Any) -> Any:
    """``value`` read as the number an int or float field wants. PyYAML follows YAML 1.1, which reads ``3e-3``
    and ``1e-8`` (no dot) as strings; Python's own spellings, ``1_000`` included, are accepted here."""
    kinds = _field_types(cls).get(name, set())
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not kinds & {int, float}:
        return value
    text = value.strip()
    try:
        return int(text) if int in kinds and float not in kinds else float(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"{cls.__name__}.{name}: expected a number, got {value!r}") from None
    if not number.is_integer():
        raise ConfigError(f"{cls.__name__}.{name}: expected an integer, got {value!r}")
    return int(number)  # an integer written as 1e3


def _from_dict(cls, data: dict[str, Any], nested: dict[str, type] | None = None):
    """Build a dataclass from a dict, refusing unknown keys by name and reading numbers written as strings."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping of fields, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(cls, k, v) for k, v in data.items()}
    for key, sub in (nested or {}).items():
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = _from_dict(sub, kwargs[key])
    return cls(**kwargs)
