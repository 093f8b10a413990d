"""Activation recomputation, the policy: which modules of a built model recompute (V3, REFERENCE §4–5).

``apply_recompute(model, mode)`` sets it on a built model (a stage, an expert shard, the MTP modules too):

    none       autograd keeps whatever it wants.
    selective  DeepSeek-V3's choice, cheap to recompute and large to keep:
               - every RMSNorm keeps only its input (not its fp32 intermediates and output);
               - MLA keeps only its latents (the q_a_proj output, the kv_a_proj_with_mqa output) and the
                 attention core's results; the up-projections q_b_proj / kv_b_proj, their norms, RoPE and
                 the q/k/v that feed the attention core are recomputed in backward. The attention core
                 itself is not where SDPA runs a fused kernel: its output and logsumexp are kept. On
                 CPU, moelib's unfused core (moelib.model.attention) keeps nothing and is rerun whole
                 (its probabilities are heads·T values per token; rerunning it costs less than the
                 fused kernel it replaces);
               - SwiGLU keeps gate and up (in FP8, 1×128 tiles, under an FP8 backend, as V3 does for the
                 MoE) and recomputes silu(gate)·up; under FP8 the down projection then keeps no input (its
                 weight gradient reads the recomputed product). Routed experts scale that product by the
                 gate value (always, not only here), so the gate value's gradient reads it too and the
                 combine keeps nothing.
    full       every decoder layer keeps only its input and is rerun in backward. Where the pipeline's
               overlapped schedule runs a MoE layer in pieces around its all-to-alls, the attention half
               is recomputed whole and the rest as in selective.

The mechanism (the hooks each module's forward calls) is moelib.model.recompute; this policy sits above
the model so that the model's files never import a module that imports them. ``fp8_swiglu_cache=False``
keeps SwiGLU inputs as they are under an FP8 backend. The backend's ``telemetry`` is wrapped once here so
that a recomputed FP8 Linear does not sample it again.
"""

from __future__ import annotations

from torch import nn

from moelib.errors import ConfigError
from moelib.model.mla import MLA
from moelib.model.mlp import MLP
from moelib.model.moe import GroupedExperts
from moelib.model.norm import RMSNorm
from moelib.model.recompute import SwiGLUCache, recomputing
from moelib.model.transformer import DecoderLayer

MODES = ("none", "selective", "full")


def _swiglu_cache(backend, fp8_cache: bool | None) -> SwiGLUCache:
    if fp8_cache is None:
        fp8_cache = getattr(backend, "is_fp8", False)
    if not fp8_cache:
        return SwiGLUCache()
    kernels = getattr(backend, "kernels", None)
    if kernels is None:
        raise ConfigError(f"fp8_swiglu_cache needs an FP8 precision backend, not {backend.name!r}.")
    return SwiGLUCache(kernels.quantize, backend.cfg.pow2_scales)


def _no_telemetry_while_recomputing(backend) -> None:
    """A recomputed FP8 Linear must not sample telemetry again (its counters are per forward call)."""
    if not hasattr(backend, "telemetry") or getattr(backend, "_recompute_telemetry_guard", False):
        return
    telemetry = backend.telemetry
    backend.telemetry = lambda weight: None if recomputing() else telemetry(weight)
    backend._recompute_telemetry_guard = True


def apply_recompute(model: nn.Module, mode: str, *, fp8_swiglu_cache: bool | None = None) -> nn.Module:
    """Set ``mode`` ("none", "selective" or "full", see the module docstring) on every layer of ``model``
    and return it. ``fp8_swiglu_cache``: keep SwiGLU inputs in FP8 (default: when the backend is FP8)."""
    if mode not in MODES:
        raise ConfigError(f"recompute mode must be one of {', '.join(MODES)}, got {mode!r}.")
    selective = mode != "none"  # "full" sets the selective flags too, for layers the pipeline runs in pieces
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.recompute = selective
        elif isinstance(m, MLA):
            m.recompute_up_proj = selective
        elif isinstance(m, (MLP, GroupedExperts)):
            backend = m.backend if isinstance(m, GroupedExperts) else m.gate_proj.backend
            m.recompute_swiglu = _swiglu_cache(backend, fp8_swiglu_cache) if selective else None
        elif isinstance(m, DecoderLayer):
            m.recompute_layer = mode == "full"
        if hasattr(m, "backend"):
            _no_telemetry_while_recomputing(m.backend)
    return model
