"""The Hugging Face DeepSeek-V3 and DeepSeek-V2 layouts: tensor names and config.json, both directions.

V2 (``deepseek_v2``: V2, V2-Lite) names its tensors as V3 does, but has no MTP layers and no router bias
(``e_score_correction_bias``), scores with softmax and routes greedy or group_limited_greedy; a moelib
config with those topk_methods is exported as deepseek_v2, every other one as deepseek_v3.

moelib's global names are the HF names without the ``model.`` prefix, except the MTP modules:
``mtp.{k}.*`` here is HF layer ``num_hidden_layers + k``, whose decoder block sits directly under the
layer, whose final norm is ``shared_head.norm``, and which carries its own copies of the shared
embedding (``embed_tokens``) and head (``shared_head.head``). Names are mapped one at a time so a
converter can stream tensors shard by shard.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from moelib.config import ModelConfig, YarnConfig
from moelib.errors import CheckpointError, ConfigError

log = logging.getLogger("moelib")

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

# deepseek_v3 for V3's routing (noaux_tc: sigmoid, selection bias); deepseek_v2 for V2's (softmax, no bias).
MODEL_TYPES = {"deepseek_v3": ("DeepseekV3ForCausalLM", ("noaux_tc",), "sigmoid"),
               "deepseek_v2": ("DeepseekV2ForCausalLM", ("greedy", "group_limited_greedy"), "softmax")}
FP8_BLOCK = (128, 128)

_SAME_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_nextn_predict_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
                "num_experts_per_tok", "n_group", "topk_group", "scoring_func", "norm_topk_prob",
                "routed_scaling_factor", "first_k_dense_replace", "rms_norm_eps", "rope_theta",
                "max_position_embeddings", "aux_loss_alpha")
_OPTIONAL = ("scoring_func", "aux_loss_alpha", "num_nextn_predict_layers", "rope_theta", "n_group", "topk_group")
# Read below, or bookkeeping with no effect on the math (ids, caching, outputs, parallel plans, dtypes).
_OTHER_FIELDS = {"architectures", "model_type", "topk_method", "initializer_range", "rope_scaling", "rope_parameters",
                 "num_key_value_heads", "moe_layer_freq", "hidden_act", "tie_word_embeddings", "attention_bias",
                 "mlp_bias", "rope_interleave", "quantization_config", "dtype", "torch_dtype", "head_dim",
                 "qk_head_dim", "seq_aux", "ep_size", "pretraining_tp", "attention_dropout", "use_cache",
                 "bos_token_id", "eos_token_id", "pad_token_id", "output_router_logits", "transformers_version",
                 "auto_map", "_name_or_path", "name_or_path", "return_dict", "output_hidden_states",
                 "output_attentions", "torchscript", "use_bfloat16", "tokenizer_class", "_attn_implementation"}
_YARN_FIELDS = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim", "rope_theta", "truncate"}


def to_hf_config(cfg: ModelConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """config.json of ``cfg``: deepseek_v2 for V2's routing (greedy / group_limited_greedy), else deepseek_v3."""
    model_type = "deepseek_v2" if cfg.topk_method in MODEL_TYPES["deepseek_v2"][1] else "deepseek_v3"
    architecture, _, scoring = MODEL_TYPES[model_type]
    if cfg.scoring_func != scoring:
        raise ConfigError(f"ModelConfig.scoring_func: the {model_type} format (topk_method {cfg.topk_method!r}) "
                          f"scores experts with {scoring}; {cfg.scoring_func!r} has no equivalent there")
    if model_type == "deepseek_v2" and (cfg.num_nextn_predict_layers or cfg.norm_topk_prob):
        field = "num_nextn_predict_layers" if cfg.num_nextn_predict_layers else "norm_topk_prob"
        raise ConfigError(f"ModelConfig.{field}: the deepseek_v2 format has no MTP modules and transformers' "
                          f"DeepseekV2 ignores norm_topk_prob, so {getattr(cfg, field)!r} cannot be exported")
    out: dict[str, Any] = {"architectures": [architecture], "model_type": model_type}
    out.update({f: getattr(cfg, f) for f in _SAME_FIELDS})
    out.update(num_key_value_heads=cfg.num_attention_heads, topk_method=cfg.topk_method, moe_layer_freq=1,
               hidden_act="silu", seq_aux=True, tie_word_embeddings=False, attention_bias=False,
               initializer_range=cfg.init_std, torch_dtype=torch_dtype,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if model_type == "deepseek_v3":
        out["rope_interleave"] = True
    else:
        del out["num_nextn_predict_layers"]
    y = cfg.rope_scaling
    out["rope_scaling"] = None if y is None else {
        "type": "yarn", "rope_type": "yarn", "factor": y.factor,
        "original_max_position_embeddings": y.original_max_position_embeddings,
        "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim}
    return out


def from_hf_config(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a deepseek_v3 or deepseek_v2 config.json, in the release's spelling (rope_scaling,
    rope_theta, torch_dtype) or transformers 5's (rope_parameters, dtype). Fields that would change the math
    in a way moelib cannot represent are refused by name; fields moelib does not know are ignored with a
    logged note."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{source}: model_type is {model_type!r}, expected {' or '.join(map(repr, MODEL_TYPES))}")
    _, topk_methods, scoring = MODEL_TYPES[model_type]
    missing = [f for f in _SAME_FIELDS if hf.get(f) is None and f not in _OPTIONAL and f != "q_lora_rank"]
    if "q_lora_rank" not in hf:
        missing.insert(0, "q_lora_rank")
    if missing:
        raise ConfigError(f"{source}: field {missing[0]!r} is missing")
    _refuse_unrepresentable(hf, source, model_type)
    topk_method = hf.get("topk_method") or topk_methods[0]
    if topk_method not in topk_methods:
        raise ConfigError(f"{source}: topk_method {topk_method!r} is not how {model_type} routes "
                          f"(expected {' or '.join(map(repr, topk_methods))})")
    if hf.get("scoring_func", scoring) != scoring:
        raise ConfigError(f"{source}: scoring_func {hf['scoring_func']!r} is not what {model_type} computes "
                          f"(transformers scores with {scoring})")
    unknown = sorted(set(hf) - set(_SAME_FIELDS) - _OTHER_FIELDS)
    if unknown:
        log.warning(f"{source}: ignoring field(s) moelib does not know: {', '.join(unknown)}")
    kwargs = {f: hf[f] for f in _SAME_FIELDS if hf.get(f) is not None or f == "q_lora_rank"}
    kwargs.update(topk_method=topk_method, scoring_func=scoring)
    if model_type == "deepseek_v2":
        kwargs["num_nextn_predict_layers"] = 0
    if topk_method == "greedy":  # V2-Lite leaves the group fields at 1, transformers' defaults at null
        kwargs.update(n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1)
    if "initializer_range" in hf:
        kwargs["init_std"] = hf["initializer_range"]
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if "rope_theta" in rope:  # transformers 5 keeps it in rope_parameters
        kwargs["rope_theta"] = rope["rope_theta"]
    if kind == "yarn":
        extra = sorted(set(rope) - _YARN_FIELDS)
        if extra or rope.get("truncate", True) is not True:
            raise ConfigError(f"{source}: rope field {(extra or ['truncate'])[0]!r} changes YaRN in a way moelib "
                              "does not implement")
        kwargs["rope_scaling"] = YarnConfig(
            factor=rope["factor"], original_max_position_embeddings=rope["original_max_position_embeddings"],
            beta_fast=rope.get("beta_fast", 32.0), beta_slow=rope.get("beta_slow", 1.0),
            mscale=rope.get("mscale", 1.0), mscale_all_dim=rope.get("mscale_all_dim", 0.0))
    elif kind != "default":
        raise ConfigError(f"{source}: rope type {kind!r} is not supported (only 'yarn' or none)")
    return ModelConfig(**kwargs)


def _refuse_unrepresentable(hf: Mapping[str, Any], source: str, model_type: str) -> None:
    """One sentence naming the first field whose value changes the math in a way moelib cannot represent."""
    heads = hf["num_attention_heads"]
    q = hf.get("quantization_config")
    rules = [
        ("num_key_value_heads", hf.get("num_key_value_heads") in (heads, None),
         f"MLA expands all {heads} heads (num_attention_heads) from one latent"),
        ("moe_layer_freq", hf.get("moe_layer_freq", 1) == 1, "in moelib every layer after the dense ones is MoE"),
        ("hidden_act", hf.get("hidden_act", "silu") == "silu", "moelib's MLPs and experts are SwiGLU ('silu')"),
        ("tie_word_embeddings", not hf.get("tie_word_embeddings"), "moelib's output head is a matrix of its own"),
        ("attention_bias", not hf.get("attention_bias"), "moelib's attention projections have no bias"),
        ("mlp_bias", not hf.get("mlp_bias"), "moelib's MLP projections have no bias"),
        ("rope_interleave", model_type != "deepseek_v3" or hf.get("rope_interleave", True),
         "moelib rotates the released weights' interleaved pairs"),
        ("norm_topk_prob", model_type != "deepseek_v2" or not hf.get("norm_topk_prob"),
         "DeepSeek's V2 code reads true as normalise without routed_scaling_factor and transformers ignores it, "
         "so moelib does not guess"),
        ("quantization_config", q is None or (
            isinstance(q, Mapping) and q.get("quant_method") == "fp8" and q.get("fmt", "e4m3") == "e4m3"
            and list(q.get("weight_block_size") or ()) == list(FP8_BLOCK)
            and q.get("activation_scheme", "dynamic") == "dynamic"),
         f"moelib reads only the FP8 release's e4m3 weights in {FP8_BLOCK[0]}x{FP8_BLOCK[1]} blocks"),
    ]
    for field, ok, why in rules:
        if not ok:
            raise ConfigError(f"{source}: {field} is {hf.get(field)!r}, which moelib cannot represent: {why}")
