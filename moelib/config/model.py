"""The network's shape: ModelConfig (field names as in HF's DeepSeek-V3 config.json) and YaRN's settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from moelib.config.fields import _from_dict, _number, _positive, _require
from moelib.config.presets import PRESETS
from moelib.errors import ConfigError


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

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Forward FLOPs per token of each kind of block at sequence length ``seq_len``: {"dense", "moe",
        "head", "mtp", "attention"}. A block is 2 x its activated matmul parameters (norms counted as one
        multiply-add per weight) plus the causal attention core, scores and values over half the sequence
        on average; "head" is the final norm and the output head, "mtp" one MTP module (a MoE block, its
        norms and eh_proj, and its own pass through the shared head); "attention" is the core of one block,
        already inside "dense", "moe" and "mtp". Training costs 3x (backward = 2 x forward)."""
        c = self.param_counts()
        h = self.hidden_size
        core = self.num_attention_heads * seq_len * (self.qk_head_dim + self.v_head_dim)
        moe = c["attention_per_layer"] + 2 * h + (self.num_experts_per_tok + self.n_shared_experts) * c["expert"] \
            + c["router_per_layer"]
        return {
            "dense": 2 * (c["attention_per_layer"] + 2 * h + c["dense_ffn_per_layer"]) + core,
            "moe": 2 * moe + core,
            "head": 2 * (c["head"] + h),
            "mtp": 2 * (moe + 3 * h + 2 * h * h + c["head"]) + core,  # + enorm, hnorm, block norm, eh_proj
            "attention": core,
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
