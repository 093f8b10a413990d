"""Configuration dataclasses, presets and validation.

Field names follow the Hugging Face DeepSeek-V3 config.json where one exists, so YAML files, the
checkpoint manifest and config.json speak the same language. Every rule a config can break is checked
in ``validate()`` and reported as one sentence naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass
class YarnConfig:
    """YaRN context extension, as in DeepSeek-V3's rope_scaling (type "yarn")."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _number(self, "factor", lambda v: v >= 1, "a number >= 1")
        _positive(self, "original_max_position_embeddings")
        _number(self, "beta_slow", lambda v: v > 0, "a positive number")
        _number(self, "beta_fast", lambda v: v > self.beta_slow, f"a number above beta_slow ({self.beta_slow})")
        for name in ("mscale", "mscale_all_dim"):
            _number(self, name, lambda v: v >= 0, "a number >= 0")


TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


@dataclass
class ModelConfig:
    """The network's shape. Defaults are DeepSeek-V3 671B."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    intermediate_size: int = 18432
    # Multi-head latent attention
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 2048
    n_group: int = 8
    topk_group: int = 4
    # noaux_tc (V3): groups ranked by the sum of their two best biased scores; group_limited_greedy (V2):
    # by their best score; greedy (V2-Lite): no group limit.
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    aux_loss_alpha: float = 1e-4
    # Multi-token prediction depth D
    num_nextn_predict_layers: int = 1
    # Positions and norms
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rope_scaling: YarnConfig | None = None
    init_std: float = 0.006

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = _from_dict(YarnConfig, self.rope_scaling)
        self.validate()

    # -- validation -------------------------------------------------------------------------------

    def validate(self) -> None:
        c = "ModelConfig"
        _positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                  "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                  "v_head_dim", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "n_group", "topk_group", "max_position_embeddings")
        if self.q_lora_rank is not None:
            _positive(self, "q_lora_rank")
        for name in ("n_shared_experts", "num_nextn_predict_layers", "first_k_dense_replace"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, c, name,
                     f"must be a non-negative integer, got {value!r}")
        _require(self.first_k_dense_replace <= self.num_hidden_layers, c, "first_k_dense_replace",
                 f"must not exceed num_hidden_layers ({self.num_hidden_layers}), "
                 f"got {self.first_k_dense_replace}")
        _require(self.qk_rope_head_dim % 2 == 0, c, "qk_rope_head_dim",
                 f"must be even (RoPE rotates pairs of dimensions), got {self.qk_rope_head_dim}")
        _require(self.n_routed_experts % self.n_group == 0, c, "n_group",
                 f"must divide n_routed_experts ({self.n_routed_experts}), got {self.n_group}")
        _require(self.topk_group <= self.n_group, c, "topk_group",
                 f"must not exceed n_group ({self.n_group}), got {self.topk_group}")
        _require(self.num_experts_per_tok <= self.n_routed_experts, c, "num_experts_per_tok",
                 f"must not exceed n_routed_experts ({self.n_routed_experts}), got {self.num_experts_per_tok}")
        group_size = self.n_routed_experts // self.n_group
        _require(self.topk_group * group_size >= self.num_experts_per_tok, c, "topk_group",
                 f"topk_group x experts per group ({self.topk_group} x {group_size}) must be at least "
                 f"num_experts_per_tok ({self.num_experts_per_tok})")
        _require(self.topk_method in TOPK_METHODS, c, "topk_method",
                 f"must be one of {', '.join(TOPK_METHODS)}, got {self.topk_method!r}")
        _require(self.scoring_func in ("sigmoid", "softmax"), c, "scoring_func",
                 f"must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        _require(isinstance(self.norm_topk_prob, bool), c, "norm_topk_prob",
                 f"must be true or false, got {self.norm_topk_prob!r}")
        for name in ("routed_scaling_factor", "rms_norm_eps", "rope_theta", "init_std"):
            _number(self, name, lambda v: v > 0, "a positive finite number")
        _number(self, "aux_loss_alpha", lambda v: v >= 0, "a number >= 0")
        _require(self.rope_scaling is None or isinstance(self.rope_scaling, YarnConfig), c, "rope_scaling",
                 f"must be a mapping of YaRN fields (or absent), got {self.rope_scaling!r}")
        if self.rope_scaling is not None:
            self.rope_scaling.validate()

    # -- derived quantities -----------------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_id: int) -> bool:
        """MTP blocks (layer_id >= num_hidden_layers) follow the deep layers, so they are MoE too."""
        return layer_id >= self.first_k_dense_replace

    def param_counts(self) -> dict[str, int]:
        """Parameter counts computed from the shapes, without allocating anything.

        ``total`` and ``activated`` are the main model (embedding and head included), ``mtp`` the unique
        parameters the MTP modules add (they share embedding and head).
        """
        h, heads = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank is None:
            q = h * heads * self.qk_head_dim
        else:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * heads * self.qk_head_dim
        kv = (h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
              + self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim))
        attention = q + kv + heads * self.v_head_dim * h
        norms = 2 * h
        dense_ffn = 3 * h * self.intermediate_size
        expert = 3 * h * self.moe_intermediate_size
        router = self.n_routed_experts * h  # the bias is a buffer, not a parameter
        moe_total = (self.n_routed_experts + self.n_shared_experts) * expert + router
        moe_active = (self.num_experts_per_tok + self.n_shared_experts) * expert + router
        embedding = head = self.vocab_size * h
        dense_layer = attention + norms + dense_ffn
        n_dense, n_moe = self.first_k_dense_replace, self.num_moe_layers
        shared = embedding + head + h  # + final norm
        total = shared + n_dense * dense_layer + n_moe * (attention + norms + moe_total)
        activated = shared + n_dense * dense_layer + n_moe * (attention + norms + moe_active)
        mtp_module = 3 * h + 2 * h * h + attention + norms + moe_total  # enorm, hnorm, norm, eh_proj
        return {
            "total": total,
            "activated": activated,
            "mtp": self.num_nextn_predict_layers * mtp_module,
            "embedding": embedding,
            "head": head,
            "attention_per_layer": attention,
            "dense_ffn_per_layer": dense_ffn,
            "expert": expert,
            "router_per_layer": router,
        }

    # -- presets and (de)serialisation ------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"ModelConfig preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
        return _from_dict(cls, {**PRESETS[name], **overrides}, {"rope_scaling": YarnConfig})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data, {"rope_scaling": YarnConfig})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # ~10M parameters: trains on 2 CPU cores in minutes. Shared + routed experts, 4 groups of 4
    # experts with 2 kept, one MTP depth.
    "tiny": dict(
        vocab_size=4096, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1,
        intermediate_size=768, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=128, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=1024,
    ),
    # ~100M parameters, for benchmarks.
    "small": dict(
        vocab_size=16384, hidden_size=512, num_hidden_layers=8, first_k_dense_replace=1,
        intermediate_size=1536, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
        n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=256, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=2048,
    ),
    # DeepSeek-V2-Lite (16B): plain query projection, softmax scores, no groups, no MTP.
    "v2-lite-16b": dict(
        vocab_size=102400, hidden_size=2048, num_hidden_layers=27, first_k_dense_replace=1,
        intermediate_size=10944, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408, n_group=1, topk_group=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
        aux_loss_alpha=0.001, num_nextn_predict_layers=0, max_position_embeddings=163840, init_std=0.02,
        rope_scaling=dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                          beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
    ),
    # DeepSeek-V3 (671B) as released.
    "v3-671b": dict(
        max_position_embeddings=163840,
        rope_scaling=dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    ),
}


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


PIPELINE_SCHEDULES = ("1f1b", "dualpipe", "dualpipev")


@dataclass
class ParallelConfig:
    """How the world is split: world = PP × DP, expert parallelism (EP) inside DP, no tensor parallelism.

    Routed experts are sharded over the EP ranks and replicated over DP / EP expert-data-parallel (EDP)
    ranks; everything else is replicated over DP. ``pipeline_schedule``: ``1f1b`` (PP stages), ``dualpipe``
    (PP stages, rank r holds stages r and PP-1-r, so PP must be even) or ``dualpipev`` (2·PP stages, rank r
    holds stages r and 2·PP-1-r). ``num_microbatches`` per DP rank and step; None takes the fewest the
    schedule accepts (1 for 1F1B, 2·PP for DualPipe/DualPipeV). ``ranks_per_node``: how many consecutive
    ranks share a node (None: one node), configurable so node-limited routing can be exercised on one
    machine. ``max_nodes_per_token``: M, the most nodes a token's routed experts may span (None: no limit;
    V3 uses 4). ``moelib.parallel.mesh.auto_layout`` picks these for a world size and model.
    """

    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    pipeline_schedule: str = "1f1b"
    num_microbatches: int | None = None
    ranks_per_node: int | None = None
    max_nodes_per_token: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_model_parallel_size

    @property
    def num_stages(self) -> int:
        """Model chunks the pipeline cuts: DualPipeV folds 2·PP stages onto PP ranks."""
        return 2 * self.pp if self.pipeline_schedule == "dualpipev" else self.pp

    @property
    def microbatches(self) -> int:
        if self.num_microbatches is not None:
            return self.num_microbatches
        return 1 if self.pipeline_schedule == "1f1b" else 2 * self.pp

    def validate(self, world_size: int | None = None, model_cfg: ModelConfig | None = None) -> None:
        """Field rules always; layout rules when the world size (and model) are known. Each broken rule
        raises ConfigError with one sentence naming the field and the rule."""
        c = "ParallelConfig"
        _positive(self, "pipeline_model_parallel_size", "expert_model_parallel_size")
        for name in ("num_microbatches", "ranks_per_node", "max_nodes_per_token"):
            if getattr(self, name) is not None:
                _positive(self, name)
        schedule = self.pipeline_schedule
        _require(schedule in PIPELINE_SCHEDULES, c, "pipeline_schedule",
                 f"must be one of {', '.join(PIPELINE_SCHEDULES)}, got {schedule!r}")
        pp, mb = self.pp, self.microbatches
        _require(schedule != "dualpipe" or pp % 2 == 0, c, "pipeline_model_parallel_size",
                 f"DualPipe needs an even pipeline size (rank r pairs with rank PP-1-r), got {pp}")
        if schedule in ("dualpipe", "dualpipev"):
            _require(mb >= 2 * pp, c, "num_microbatches",
                     f"{schedule} needs at least 2 x pipeline size = {2 * pp} micro-batches, got {mb}")
        _require(schedule != "dualpipe" or mb % 2 == 0, c, "num_microbatches",
                 f"DualPipe needs an even number of micro-batches (half enter from each end), got {mb}")
        if world_size is not None:
            self._validate_world(world_size)
        if model_cfg is not None:
            self._validate_model(model_cfg)

    def _validate_world(self, world: int) -> None:
        c, pp, ep = "ParallelConfig", self.pp, self.ep
        _require(isinstance(world, int) and world > 0, c, "world_size", f"must be a positive integer, got {world!r}")
        _require(world % pp == 0, c, "pipeline_model_parallel_size",
                 f"world size {world} is not divisible by pipeline size {pp}")
        dp = world // pp
        _require(dp % ep == 0, c, "expert_model_parallel_size",
                 f"expert-parallel size {ep} does not divide the data-parallel size {dp} "
                 f"(world {world} / pipeline {pp}); EP groups live inside DP")
        rpn = self.ranks_per_node
        if rpn is not None:
            _require(world % rpn == 0, c, "ranks_per_node", f"{rpn} does not divide the world size {world}")
            # EP ranks are consecutive; an EP group must fill whole nodes or sit inside one.
            _require(ep % rpn == 0 or rpn % ep == 0, c, "ranks_per_node",
                     f"{rpn} ranks per node cut expert-parallel groups of {ep} consecutive ranks unevenly "
                     "(one must divide the other)")

    def _validate_model(self, m: ModelConfig) -> None:
        c, ep = "ParallelConfig", self.ep
        _require(m.n_routed_experts % ep == 0, c, "expert_model_parallel_size",
                 f"expert-parallel size {ep} does not divide n_routed_experts {m.n_routed_experts}")
        stages = self.num_stages
        what = f"{self.pipeline_schedule} cuts the model into {stages} stages"
        _require(stages <= m.num_hidden_layers, c, "pipeline_model_parallel_size",
                 f"{what}, more than num_hidden_layers {m.num_hidden_layers} (each stage needs a decoder layer)")
        if self.max_nodes_per_token is not None and self.ranks_per_node is not None and ep > self.ranks_per_node:
            experts_per_node = m.n_routed_experts // (ep // self.ranks_per_node)
            _require(self.max_nodes_per_token * experts_per_node >= m.num_experts_per_tok, c, "max_nodes_per_token",
                     f"{self.max_nodes_per_token} nodes x {experts_per_node} experts per node cannot hold "
                     f"num_experts_per_tok {m.num_experts_per_tok} experts")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParallelConfig:
        return _from_dict(cls, data)


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
