"""The single-process training loop's hyperparameters and the Linear layers' numerics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moelib.config.fields import _from_dict, _number, _positive, _require

PRECISION_BACKENDS = ("fp32", "bf16", "fp8-emulated", "fp8-triton", "fp8-te")


@dataclass
class PrecisionConfig:
    """Numerics of the Linear layers. ``fp32``: everything fp32. ``bf16``: fp32 master weights, bf16
    compute under autocast; the router, norms and losses stay fp32. ``fp8-*``: as bf16, but every Linear's
    three GEMMs take E4M3 inputs in DeepSeek-V3's 1×128 / 128×128 tiles: ``fp8-emulated`` in pure PyTorch
    (runs anywhere), ``fp8-triton`` with moelib_cuda's kernels, ``fp8-te`` through Transformer Engine.

    ``pow2_scales``: round every scale up to a power of two (Transformer Engine's Float8BlockScaling default);
    the attention-output projection and expert inputs use power-of-two scales either way, as in V3.
    ``telemetry_interval``: record FP8 underflow/saturation counts and amax on every N-th call of each
    Linear (0: off); read them with ``moelib.precision.telemetry.collect_telemetry(model)``.
    ``amax_history_len``: how many recorded amax values each Linear keeps.
    """

    backend: str = "bf16"
    pow2_scales: bool = False
    telemetry_interval: int = 0
    amax_history_len: int = 16

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        c = "PrecisionConfig"
        _require(self.backend in PRECISION_BACKENDS, c, "backend",
                 f"must be one of {', '.join(PRECISION_BACKENDS)}, got {self.backend!r}")
        _require(isinstance(self.pow2_scales, bool), c, "pow2_scales",
                 f"must be true or false, got {self.pow2_scales!r}")
        _require(isinstance(self.telemetry_interval, int) and not isinstance(self.telemetry_interval, bool)
                 and self.telemetry_interval >= 0, c, "telemetry_interval",
                 f"must be a non-negative integer (0: off), got {self.telemetry_interval!r}")
        _positive(self, "amax_history_len")

    @property
    def is_fp8(self) -> bool:
        return self.backend.startswith("fp8")


@dataclass
class TrainConfig:
    """Hyperparameters of the single-process training loop (V3's values as defaults)."""

    micro_batch_size: int = 8
    seq_length: int = 128
    train_iters: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: int = 20
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bias_update_speed: float = 1e-3  # gamma of aux-loss-free balancing
    mtp_loss_weight: float = 0.3     # lambda
    moment_dtype: str = "fp32"       # AdamW first/second moments: "fp32" or "bf16" (V3)
    ema_decay: float = 0.0           # parameter EMA kept in CPU memory; 0 turns it off (V3 keeps one)
    recompute: str = "none"          # activation recomputation: "none", "selective" (V3) or "full"
    seed: int = 1234
    log_interval: int = 10
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

    def __post_init__(self) -> None:
        if isinstance(self.precision, str):  # `precision: bf16`: the backend's name alone
            self.precision = PrecisionConfig(backend=self.precision)
        if isinstance(self.precision, dict):
            self.precision = _from_dict(PrecisionConfig, self.precision)
        self.validate()

    def validate(self) -> None:
        c = "TrainConfig"
        _positive(self, "micro_batch_size", "seq_length", "train_iters", "log_interval")
        _number(self, "lr", lambda v: v > 0, "a positive number")
        _number(self, "min_lr", lambda v: 0 <= v <= self.lr, f"a number in [0, lr={self.lr}]")
        _require(isinstance(self.lr_warmup_iters, int) and not isinstance(self.lr_warmup_iters, bool)
                 and self.lr_warmup_iters >= 0, c, "lr_warmup_iters",
                 f"must be a non-negative integer, got {self.lr_warmup_iters!r}")
        for name in ("adam_beta1", "adam_beta2"):
            _number(self, name, lambda v: 0 <= v < 1, "a number in [0, 1)")
        _number(self, "adam_eps", lambda v: v > 0, "a positive number")
        for name in ("weight_decay", "clip_grad", "bias_update_speed", "mtp_loss_weight"):
            _number(self, name, lambda v: v >= 0, "a number >= 0")
        _require(self.moment_dtype in ("fp32", "bf16"), c, "moment_dtype",
                 f"must be fp32 or bf16, got {self.moment_dtype!r}")
        _number(self, "ema_decay", lambda v: 0 <= v < 1, "a number in [0, 1) (0: no EMA)")
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**63, c,
                 "seed", f"must be a non-negative integer, got {self.seed!r}")
        _require(isinstance(self.precision, PrecisionConfig), c, "precision",
                 f"must be a backend name or a mapping of PrecisionConfig fields, got {self.precision!r}")
        _require(self.recompute in ("none", "selective", "full"), c, "recompute",
                 f"must be none, selective or full, got {self.recompute!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data, {"precision": PrecisionConfig})
