"""The Hugging Face DeepSeek-V3 layout: tensor names and config.json, both directions.

moelib's global names are the HF names without the ``model.`` prefix, except the MTP modules:
``mtp.{k}.*`` here is HF layer ``num_hidden_layers + k``, whose decoder block sits directly under the
layer, whose final norm is ``shared_head.norm``, and which carries its own copies of the shared
embedding (``embed_tokens``) and head (``shared_head.head``). Names are mapped one at a time so a
converter can stream tensors shard by shard.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from moelib.config import ModelConfig, YarnConfig
from moelib.errors import CheckpointError, ConfigError

_MTP = re.compile(r"mtp\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight")

# Tensors the FP8 release leaves unquantised besides norms and biases.
HF_HIGH_PRECISION = ("mlp.gate.weight", "eh_proj.weight", "embed_tokens.weight", "lm_head.weight",
                     "shared_head.head.weight")


def to_hf_name(name: str, cfg: ModelConfig) -> str:
    """moelib global parameter name -> HF tensor name."""
    m = _MTP.fullmatch(name)
    if m is None:
        return name if name == "lm_head.weight" else f"model.{name}"
    layer, rest = cfg.num_hidden_layers + int(m.group(1)), m.group(2)
    if rest.startswith("layer."):
        rest = rest[len("layer."):]
    elif rest == "norm.weight":
        rest = "shared_head.norm.weight"
    elif rest not in _MTP_OWN:
        raise CheckpointError(f"tensor {name}: not part of a DeepSeek-V3 MTP module")
    return f"model.layers.{layer}.{rest}"


def from_hf_name(name: str, cfg: ModelConfig) -> str | None:
    """HF tensor name -> moelib name; None for the MTP modules' copies of the shared embedding and head."""
    if name == "lm_head.weight":
        return name
    m = _HF_LAYER.fullmatch(name)
    if m is None:
        if not name.startswith("model."):
            raise CheckpointError(f"tensor {name}: not a DeepSeek-V3 tensor name")
        return name[len("model."):]
    layer, rest = int(m.group(1)), m.group(2)
    if layer < cfg.num_hidden_layers:
        return name[len("model."):]
    k = layer - cfg.num_hidden_layers
    if k >= cfg.num_nextn_predict_layers:
        raise CheckpointError(f"tensor {name}: layer {layer} is beyond the {cfg.num_hidden_layers} layers and "
                              f"{cfg.num_nextn_predict_layers} MTP modules of config.json")
    if rest in ("embed_tokens.weight", "shared_head.head.weight"):
        return None
    if rest == "shared_head.norm.weight":
        return f"mtp.{k}.norm.weight"
    return f"mtp.{k}.{rest}" if rest in _MTP_OWN else f"mtp.{k}.layer.{rest}"


def is_hf_mtp(name: str, cfg: ModelConfig) -> bool:
    """Whether an HF tensor belongs to an MTP layer (layer index num_hidden_layers and up)."""
    m = _HF_LAYER.fullmatch(name)
    return m is not None and int(m.group(1)) >= cfg.num_hidden_layers


def mtp_shared_copies(cfg: ModelConfig) -> dict[str, str]:
    """HF names of the MTP layers' stored copies -> the moelib tensor they copy."""
    out = {}
    for k in range(cfg.num_nextn_predict_layers):
        layer = cfg.num_hidden_layers + k
        out[f"model.layers.{layer}.embed_tokens.weight"] = "embed_tokens.weight"
        out[f"model.layers.{layer}.shared_head.head.weight"] = "lm_head.weight"
    return out


def to_hf_state_dict(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for a moelib state dict, MTP copies of embedding and head included."""
    for name, tensor in state.items():
        yield to_hf_name(name, cfg), tensor
    for hf_name, source in mtp_shared_copies(cfg).items():
        yield hf_name, state[source]


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for hf_name, tensor in hf_state.items():
        name = from_hf_name(hf_name, cfg)
        if name is not None:
            out[name] = tensor
    return out


# -- config.json --------------------------------------------------------------------------------------

_SAME_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_nextn_predict_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
                "num_experts_per_tok", "n_group", "topk_group", "scoring_func", "norm_topk_prob",
                "routed_scaling_factor", "first_k_dense_replace", "rms_norm_eps", "rope_theta",
                "max_position_embeddings", "aux_loss_alpha")


def to_hf_config(cfg: ModelConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    if cfg.scoring_func != "sigmoid":
        raise ConfigError("ModelConfig.scoring_func: the DeepSeek-V3 format scores experts with a sigmoid; "
                          f"{cfg.scoring_func!r} has no equivalent there")
    out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    out.update({f: getattr(cfg, f) for f in _SAME_FIELDS})
    out.update(num_key_value_heads=cfg.num_attention_heads, topk_method="noaux_tc", moe_layer_freq=1,
               hidden_act="silu", seq_aux=True, tie_word_embeddings=False, attention_bias=False,
               rope_interleave=True, initializer_range=cfg.init_std, torch_dtype=torch_dtype,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
    y = cfg.rope_scaling
    out["rope_scaling"] = None if y is None else {
        "type": "yarn", "rope_type": "yarn", "factor": y.factor,
        "original_max_position_embeddings": y.original_max_position_embeddings,
        "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim}
    return out


def from_hf_config(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type != "deepseek_v3":
        raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'deepseek_v3'")
    optional = ("scoring_func", "aux_loss_alpha", "num_nextn_predict_layers", "rope_theta")
    missing = [f for f in _SAME_FIELDS if f not in hf and f not in optional]
    if missing:
        raise ConfigError(f"{source}: field {missing[0]!r} is missing")
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads:
        raise ConfigError(f"{source}: num_key_value_heads must equal num_attention_heads ({heads}) for MLA")
    if hf.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"{source}: moe_layer_freq must be 1 (every layer after first_k_dense_replace is MoE)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act must be 'silu', got {hf['hidden_act']!r}")
    kwargs = {f: hf[f] for f in _SAME_FIELDS if f in hf}
    if "initializer_range" in hf:
        kwargs["init_std"] = hf["initializer_range"]
    rope = hf.get("rope_scaling") or hf.get("rope_parameters")
    if rope and rope.get("type", rope.get("rope_type")) == "yarn":
        kwargs["rope_scaling"] = YarnConfig(
            factor=rope["factor"], original_max_position_embeddings=rope["original_max_position_embeddings"],
            beta_fast=rope.get("beta_fast", 32.0), beta_slow=rope.get("beta_slow", 1.0),
            mscale=rope.get("mscale", 1.0), mscale_all_dim=rope.get("mscale_all_dim", 0.0))
        kwargs.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    elif rope and rope.get("type", rope.get("rope_type")) not in (None, "default"):
        raise ConfigError(f"{source}: rope_scaling type {rope.get('type', rope.get('rope_type'))!r} is not supported "
                          "(only 'yarn')")
    return ModelConfig(**kwargs)
