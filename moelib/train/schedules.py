"""Training schedules.

``lr_at(step, cfg)`` is the step-driven LR of the single-process loop: linear warm-up, then cosine decay.

The rest is DeepSeek-V3's token-driven shape (REFERENCE §2, §3, §8): every schedule is a function of the
tokens consumed so far, so it does not care how the batch grows.

* LR: linear warm-up from 0 to ``lr`` → constant until ``lr_constant_until_tokens`` → cosine down to
  ``min_lr`` over ``lr_decay_tokens`` → ``min_lr`` → constant tails ``lr_tails`` (V3: 2.2e-5, then 7.3e-6).
* Batch size (sequences): linear ramp from ``batch_start`` to ``batch_end`` over ``batch_ramp_tokens``,
  rounded down to a multiple of ``batch_granularity`` (Megatron's --rampup-batch-size steps).
* MTP weight λ: ``mtp_weight`` before ``mtp_switch_tokens``, ``mtp_weight_after`` from there on.
* Bias update speed γ: ``bias_update_speed`` before ``bias_freeze_tokens``, 0 from there on.

Warm-up is given in tokens like every other boundary, so one number fixes the curve whatever the batch ramp
does. V3 warms up over 2000 *steps*; ``tokens_for_steps`` converts steps into the tokens they consume under
the batch ramp, and ``ScheduleConfig.v3()`` uses it for V3's 2000 steps.

A ``Schedules`` object carries the only state (tokens and samples consumed) and is called once per step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from moelib.config import TrainConfig
from moelib.config.fields import _from_dict, _positive, _require
from moelib.errors import ConfigError


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step ``step`` (0-based)."""
    if step < cfg.lr_warmup_iters:
        return cfg.lr * (step + 1) / cfg.lr_warmup_iters
    span = max(cfg.train_iters - cfg.lr_warmup_iters, 1)
    progress = min((step - cfg.lr_warmup_iters) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# -- DeepSeek-V3's published numbers (paper §4.2 and REFERENCE §8) -------------------------------------------

_B = 10**9
V3_SEQ_LENGTH = 4096
V3_WARMUP_STEPS = 2000
V3_TOTAL_TOKENS = 14_800 * _B
# Positions on V3's 14.8T-token run, in billions of tokens; ``for_budget`` scales them to other budgets.
_V3_CONSTANT_END = 10_000      # LR leaves the peak, λ drops to 0.1
_V3_COSINE_END = 14_300        # LR reaches 2.2e-5; γ drops to 0 for the remaining 500B tokens
_V3_LAST_TAIL = 14_633         # 333B tokens later the LR drops to 7.3e-6 for the final 167B
_V3_BATCH_RAMP = 469
_V3_TOTAL = 14_800
_V3_LR, _V3_MIN_LR, _V3_LAST_LR = 2.2e-4, 2.2e-5, 7.3e-6


def _ramp(tokens: int, start: int, end: int, ramp_tokens: int, granularity: int) -> int:
    """Batch size after ``tokens`` tokens, in exact integer arithmetic so the boundaries are exact."""
    if tokens >= ramp_tokens:
        return end
    grown = (end - start) * tokens // ramp_tokens
    return start + grown // granularity * granularity


def _tokens_for_steps(steps: int, seq_length: int, *ramp: int) -> int:
    tokens = 0
    for _ in range(steps):
        tokens += _ramp(tokens, *ramp) * seq_length
    return tokens


_V3_RAMP = (3072, 15360, _V3_BATCH_RAMP * _B, 1)
V3_WARMUP_TOKENS = _tokens_for_steps(V3_WARMUP_STEPS, V3_SEQ_LENGTH, *_V3_RAMP)


# -- configuration ------------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ScheduleConfig:
    """Token-driven schedules. Every ``*_tokens`` field counts tokens consumed; batch sizes count sequences
    of ``seq_length`` tokens. Defaults are DeepSeek-V3's 14.8T-token run (see ``v3()``)."""

    seq_length: int = V3_SEQ_LENGTH
    # LR
    lr: float = _V3_LR
    min_lr: float = _V3_MIN_LR
    lr_warmup_tokens: int = V3_WARMUP_TOKENS
    lr_constant_until_tokens: int = _V3_CONSTANT_END * _B
    lr_decay_tokens: int = (_V3_COSINE_END - _V3_CONSTANT_END) * _B
    # (start_tokens, lr) pairs after the cosine, each holding until the next one starts.
    lr_tails: list[tuple[int, float]] = field(
        default_factory=lambda: [(_V3_COSINE_END * _B, _V3_MIN_LR), (_V3_LAST_TAIL * _B, _V3_LAST_LR)])
    # Global batch size in sequences
    batch_start: int = 3072
    batch_end: int = 15360
    batch_ramp_tokens: int = _V3_BATCH_RAMP * _B
    batch_granularity: int = 1  # e.g. micro-batch × DP × micro-batches; V3 did not publish its increment
    # MTP weight λ
    mtp_weight: float = 0.3
    mtp_weight_after: float = 0.1
    mtp_switch_tokens: int = _V3_CONSTANT_END * _B
    # Router bias update speed γ
    bias_update_speed: float = 1e-3
    bias_freeze_tokens: int = _V3_COSINE_END * _B

    def __post_init__(self) -> None:
        # JSON and YAML give the tails back as lists of lists.
        if isinstance(self.lr_tails, (list, tuple)):
            self.lr_tails = [tuple(t) if isinstance(t, (list, tuple)) else t for t in self.lr_tails]
        self.validate()

    def validate(self) -> None:
        c = "ScheduleConfig"
        _positive(self, "seq_length", "batch_start", "batch_end", "batch_granularity")
        for name in ("lr_warmup_tokens", "lr_constant_until_tokens", "lr_decay_tokens", "batch_ramp_tokens",
                     "mtp_switch_tokens", "bias_freeze_tokens"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 0, c, name, f"must be a non-negative integer, got {value!r}")
        for name in ("lr", "min_lr", "mtp_weight", "mtp_weight_after", "bias_update_speed"):
            value = getattr(self, name)
            _require(_is_number(value) and value >= 0, c, name, f"must be a finite number >= 0, got {value!r}")
        _require(self.lr > 0, c, "lr", f"must be positive, got {self.lr}")
        _require(self.min_lr <= self.lr, c, "min_lr", f"must not exceed lr ({self.lr}), got {self.min_lr}")
        _require(self.lr_warmup_tokens <= self.lr_constant_until_tokens, c, "lr_warmup_tokens",
                 f"must not exceed lr_constant_until_tokens ({self.lr_constant_until_tokens}), "
                 f"got {self.lr_warmup_tokens}")
        self._validate_tails()
        _require(self.batch_start <= self.batch_end, c, "batch_start",
                 f"must not exceed batch_end ({self.batch_end}), got {self.batch_start}")
        # Both ends on the grid keeps every ramped batch on it and inside [batch_start, batch_end].
        for name in ("batch_start", "batch_end"):
            value = getattr(self, name)
            _require(value % self.batch_granularity == 0, c, name,
                     f"must be a multiple of batch_granularity ({self.batch_granularity}), got {value}")

    def _validate_tails(self) -> None:
        c = "ScheduleConfig"
        tails = self.lr_tails
        _require(isinstance(tails, list), c, "lr_tails", f"must be a list of (start_tokens, lr) pairs, got {tails!r}")
        previous_start, previous_lr = self.cosine_end_tokens, self.min_lr
        for i, tail in enumerate(tails):
            ok = isinstance(tail, tuple) and len(tail) == 2 and _is_int(tail[0]) and _is_number(tail[1])
            _require(ok, c, f"lr_tails[{i}]", f"must be a (start_tokens, lr) pair of an integer and a number, "
                     f"got {tail!r}")
            start, lr = tail
            # Tails anneal: each starts after the cosine (and the previous tail) and never raises the LR.
            _require(start >= previous_start and (i == 0 or start > previous_start), c, f"lr_tails[{i}]",
                     f"must start after the cosine end ({self.cosine_end_tokens}) and the previous tail, "
                     f"got {start}")
            _require(0 <= lr <= previous_lr, c, f"lr_tails[{i}]",
                     f"must have an LR in [0, {previous_lr}] (tails never raise the LR), got {lr}")
            previous_start, previous_lr = start, lr

    @property
    def cosine_end_tokens(self) -> int:
        return self.lr_constant_until_tokens + self.lr_decay_tokens

    # -- presets and (de)serialisation ------------------------------------------------------------------

    @classmethod
    def v3(cls, **overrides: Any) -> ScheduleConfig:
        """DeepSeek-V3's schedules. Warm-up is V3's 2000 steps, in the tokens they consume under the batch
        ramp (recomputed when ``overrides`` change the ramp, unless ``lr_warmup_tokens`` is given)."""
        if "lr_warmup_tokens" in overrides:
            return cls(**overrides)
        cfg = cls(**{**overrides, "lr_warmup_tokens": 0})
        return dataclasses.replace(cfg, lr_warmup_tokens=tokens_for_steps(V3_WARMUP_STEPS, cfg))

    @classmethod
    def for_budget(cls, total_tokens: int, lr: float, min_lr: float, warmup_tokens: int | None = None, *,
                   warmup_steps: int | None = None, seq_length: int, batch_end: int,
                   batch_start: int | None = None, batch_granularity: int = 1, mtp_weight: float = 0.3,
                   mtp_weight_after: float = 0.1, bias_update_speed: float = 1e-3) -> ScheduleConfig:
        """V3's shape scaled to ``total_tokens``: every boundary sits at the fraction of the run it sits at in
        V3's 14.8T tokens (constant LR and λ = 0.3 until 67.6%, i.e. ~2/3; cosine to ``min_lr`` until 96.6%,
        where γ drops to 0 for the last ~3%; ``min_lr`` then min_lr × 7.3e-6/2.2e-5 from 98.9%; batch ramp
        over the first 3.2%). Give the warm-up in tokens, or in steps (converted under the batch ramp).
        ``batch_start`` defaults to ``batch_end`` (no ramp)."""
        _require(_is_int(total_tokens) and total_tokens > 0, "ScheduleConfig.for_budget", "total_tokens",
                 f"must be a positive integer, got {total_tokens!r}")
        _require((warmup_tokens is None) != (warmup_steps is None), "ScheduleConfig.for_budget", "warmup_tokens",
                 "give exactly one of warmup_tokens and warmup_steps")

        def at(v3_position: int) -> int:
            return total_tokens * v3_position // _V3_TOTAL

        constant_end, cosine_end = at(_V3_CONSTANT_END), at(_V3_COSINE_END)
        cfg = cls(
            seq_length=seq_length, lr=lr, min_lr=min_lr, lr_warmup_tokens=warmup_tokens or 0,
            lr_constant_until_tokens=constant_end, lr_decay_tokens=cosine_end - constant_end,
            lr_tails=[(cosine_end, min_lr), (at(_V3_LAST_TAIL), min_lr * (_V3_LAST_LR / _V3_MIN_LR))],
            batch_start=batch_end if batch_start is None else batch_start, batch_end=batch_end,
            batch_ramp_tokens=at(_V3_BATCH_RAMP), batch_granularity=batch_granularity,
            mtp_weight=mtp_weight, mtp_weight_after=mtp_weight_after, mtp_switch_tokens=constant_end,
            bias_update_speed=bias_update_speed, bias_freeze_tokens=cosine_end,
        )
        if warmup_steps is not None:
            _require(_is_int(warmup_steps) and warmup_steps >= 0, "ScheduleConfig.for_budget", "warmup_steps",
                     f"must be a non-negative integer, got {warmup_steps!r}")
            cfg = dataclasses.replace(cfg, lr_warmup_tokens=tokens_for_steps(warmup_steps, cfg))
        return cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScheduleConfig:
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "lr_tails": [list(t) for t in self.lr_tails]}


# -- the schedules as pure functions of consumed tokens -----------------------------------------------------

def _check_tokens(tokens: int) -> None:
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")


def lr_at_tokens(tokens: int, cfg: ScheduleConfig) -> float:
    """LR once ``tokens`` tokens have been consumed."""
    _check_tokens(tokens)
    if tokens < cfg.lr_warmup_tokens:
        return cfg.lr * tokens / cfg.lr_warmup_tokens
    if tokens < cfg.lr_constant_until_tokens:
        return cfg.lr
    if tokens < cfg.cosine_end_tokens:
        progress = (tokens - cfg.lr_constant_until_tokens) / cfg.lr_decay_tokens
        # Written as peak minus a drop that is exactly 0 at progress 0, so the cosine starts exactly at the
        # peak; its end (progress 1) is the min_lr branch below, so it ends exactly at min_lr.
        return cfg.lr - (cfg.lr - cfg.min_lr) * 0.5 * (1 - math.cos(math.pi * progress))
    lr = cfg.min_lr
    for start, tail_lr in cfg.lr_tails:
        if tokens < start:
            break
        lr = tail_lr
    return lr


def batch_size_at(tokens: int, cfg: ScheduleConfig) -> int:
    """Global batch size in sequences for the step that starts after ``tokens`` tokens."""
    _check_tokens(tokens)
    return _ramp(tokens, cfg.batch_start, cfg.batch_end, cfg.batch_ramp_tokens, cfg.batch_granularity)


def mtp_weight_at(tokens: int, cfg: ScheduleConfig) -> float:
    """MTP loss weight λ once ``tokens`` tokens have been consumed."""
    _check_tokens(tokens)
    return cfg.mtp_weight if tokens < cfg.mtp_switch_tokens else cfg.mtp_weight_after


def bias_speed_at(tokens: int, cfg: ScheduleConfig) -> float:
    """Router-bias update speed γ once ``tokens`` tokens have been consumed."""
    _check_tokens(tokens)
    return cfg.bias_update_speed if tokens < cfg.bias_freeze_tokens else 0.0


def tokens_for_steps(steps: int, cfg: ScheduleConfig) -> int:
    """Tokens the first ``steps`` steps consume under ``cfg``'s batch ramp (to give a warm-up in steps)."""
    return _tokens_for_steps(steps, cfg.seq_length, cfg.batch_start, cfg.batch_end, cfg.batch_ramp_tokens,
                             cfg.batch_granularity)


def schedule_for_run(train: TrainConfig, global_batch: int, *, rampup: tuple[int, int, int] | None = None,
                     overrides: dict[str, Any] | None = None) -> ScheduleConfig:
    """The schedules of a run of ``train.train_iters`` steps: V3's shape (``for_budget``) scaled to the
    tokens those steps consume, with the run's peak and final LR, warm-up steps, λ (dropping to a third of
    it, as V3's 0.3 → 0.1) and γ. ``rampup`` is Megatron's --rampup-batch-size (start, increment, ramp-up
    samples), ending at ``global_batch``. ``overrides`` (the recipe YAML's ``schedule`` section) replace
    any field at the end."""
    seq = train.seq_length
    start, increment, samples = rampup if rampup is not None else (global_batch, global_batch, 0)
    _require(_is_int(start) and 0 < start <= global_batch, "rampup_batch_size", "start",
             f"must lie in [1, global batch size {global_batch}], got {start!r}")
    _require(_is_int(increment) and increment > 0, "rampup_batch_size", "increment",
             f"must be a positive integer, got {increment!r}")
    _require(_is_int(samples) and samples >= 0, "rampup_batch_size", "samples",
             f"must be a non-negative integer, got {samples!r}")
    ramp = (start, global_batch, samples * seq, increment)
    total = _tokens_for_steps(train.train_iters, seq, *ramp)
    cfg = ScheduleConfig.for_budget(total, train.lr, train.min_lr, 0, seq_length=seq, batch_end=global_batch,
                                    batch_start=start, batch_granularity=increment,
                                    mtp_weight=train.mtp_loss_weight, mtp_weight_after=train.mtp_loss_weight / 3,
                                    bias_update_speed=train.bias_update_speed)
    cfg = dataclasses.replace(cfg, batch_ramp_tokens=samples * seq)
    warmup = tokens_for_steps(train.lr_warmup_iters, cfg)
    if warmup > cfg.lr_constant_until_tokens:
        # A warm-up longer than V3's constant phase (short runs): the cosine and the tails start after it.
        shift = warmup - cfg.lr_constant_until_tokens
        tails = [(start + shift, lr) for start, lr in cfg.lr_tails]
        cfg = dataclasses.replace(cfg, lr_constant_until_tokens=warmup, lr_tails=tails)
    cfg = dataclasses.replace(cfg, lr_warmup_tokens=warmup)
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ScheduleConfig)})
        if unknown:
            raise ConfigError(f"schedule.{unknown[0]}: not a ScheduleConfig field")
        cfg = ScheduleConfig.from_dict({**cfg.to_dict(), **overrides})
    return cfg


# -- the per-step object a trainer holds --------------------------------------------------------------------

@dataclass
class ScheduleState:
    """Everything the schedules remember; the rest derives from the config. Plain JSON in a manifest."""

    consumed_tokens: int = 0
    consumed_samples: int = 0

    def __post_init__(self) -> None:
        for name in ("consumed_tokens", "consumed_samples"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 0, "ScheduleState", name,
                     f"must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class StepValues:
    """What one step uses. ``batch_size`` is sized from the tokens consumed before the step (the step needs
    it to fetch its data); the rest is read at ``tokens``, the tokens consumed once the step is done, so the
    first step trains at a non-zero LR (as ``lr_at``'s step + 1) and the last warm-up step reaches the peak."""

    batch_size: int
    tokens: int
    lr: float
    mtp_weight: float
    bias_update_speed: float


class Schedules:
    """Call ``step()`` once per optimizer step; save ``state_dict()`` in the checkpoint manifest and give it
    back to ``load_state_dict()`` (or the constructor) to resume exactly."""

    def __init__(self, cfg: ScheduleConfig, state: ScheduleState | dict[str, int] | None = None):
        self.cfg = cfg
        self.state = ScheduleState()
        if state is not None:
            self.load_state_dict(state if isinstance(state, dict) else dataclasses.asdict(state))

    def values_at(self, tokens: int) -> tuple[float, float, float]:
        """(lr, mtp_weight, bias_update_speed) once ``tokens`` tokens have been consumed."""
        return lr_at_tokens(tokens, self.cfg), mtp_weight_at(tokens, self.cfg), bias_speed_at(tokens, self.cfg)

    def step(self) -> StepValues:
        """Size the next step from the tokens consumed so far, count its tokens as consumed and return the
        values it trains with. A step later skipped (non-finite loss) still consumed its data."""
        batch = batch_size_at(self.state.consumed_tokens, self.cfg)
        self.state.consumed_samples += batch
        self.state.consumed_tokens += batch * self.cfg.seq_length
        lr, mtp, gamma = self.values_at(self.state.consumed_tokens)
        return StepValues(batch_size=batch, tokens=self.state.consumed_tokens, lr=lr,
                          mtp_weight=mtp, bias_update_speed=gamma)

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self.state)

    def load_state_dict(self, data: dict[str, Any]) -> None:
        # Both counters are required: a manifest missing one must not silently restart the schedules at 0.
        if not isinstance(data, dict):
            raise ConfigError(f"ScheduleState: expected a mapping of fields, got {type(data).__name__}")
        missing = sorted({f.name for f in dataclasses.fields(ScheduleState)} - set(data))
        if missing:
            raise ConfigError(f"ScheduleState.{missing[0]}: missing from the saved schedule state")
        self.state = _from_dict(ScheduleState, data)


__all__ = [
    "ScheduleConfig", "ScheduleState", "Schedules", "StepValues", "V3_WARMUP_STEPS", "V3_WARMUP_TOKENS",
    "batch_size_at", "bias_speed_at", "lr_at", "lr_at_tokens", "mtp_weight_at", "schedule_for_run",
    "tokens_for_steps",
]
