"""Activation recomputation, the mechanism: keep less for backward and recompute the rest in it (V3,
REFERENCE §4–5). Which modules recompute is a policy set from above (moelib.train.recompute.apply_recompute,
whose docstring lists the modes); this module only provides the hooks the modules call.

Each module owns its switch: a flag checked in its forward (RMSNorm.recompute, MLA.recompute_up_proj,
MLP/GroupedExperts.recompute_swiglu, DecoderLayer.recompute_layer), which then calls ``checkpoint`` or
``swiglu`` from here. Regions never nest: inside one, the hooks run the plain forward. This module imports
no model module, so every model file can import it.

Numerics do not change: a region's backward is the original graph (non-reentrant torch.utils.checkpoint)
fed with bit-identical recomputed tensors, and the SwiGLU backward is autograd's own on the recomputed
product. The one exception is deliberate and V3's (REFERENCE §4 "Storage"): with SwiGLU inputs cached in FP8,
gradients are computed from the FP8-rounded gate and up, including the down projection's weight gradient
(from SwiGLU's output recomputed from them: that GEMM keeps no input of its own) and the gate weights'
gradient (routed experts scale SwiGLU's output by them, ``probs``); the forward is unchanged.

Side effects are not repeated when a region is recomputed: MoE.finish checks ``recomputing()`` before
adding expert loads and the aux loss, and FP8 telemetry is not sampled. A recomputed MoE layer under expert
parallelism reruns its dispatch and combine all-to-alls in backward (every rank recomputes the same layers
in the same order).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from moelib.precision import fp8


class _State(threading.local):
    depth = 0        # > 0 while a recompute region runs (its forward or its recomputation)
    recomputing = 0  # > 0 while a region is rerun in backward


_state = _State()


def recomputing() -> bool:
    """True while a region's forward is being rerun in backward: skip side effects (counters, stats)."""
    return _state.recomputing > 0


def should_recompute(flag: bool) -> bool:
    """A module's hook: recompute when its flag is set, gradients are being recorded and no enclosing
    region already recomputes it."""
    return bool(flag) and torch.is_grad_enabled() and _state.depth == 0


def checkpoint(fn: Callable, *args: torch.Tensor, keep: Callable | None = None):
    """fn(*args), keeping only ``args`` (and what ``keep`` selects, see ``keep_attention_core``) for
    backward, which reruns fn to get the rest (non-reentrant torch.utils.checkpoint)."""
    calls = 0

    def run(*a):
        nonlocal calls
        calls += 1
        again = calls > 1
        _state.depth += 1
        _state.recomputing += again
        try:
            return fn(*a)
        finally:
            _state.depth -= 1
            _state.recomputing -= again

    extra = {} if keep is None else {"context_fn": keep}
    return _torch_checkpoint(run, *args, use_reentrant=False, **extra)


# ---- the attention core inside the MLA region ------------------------------------------------------------


def _ops(*names: str) -> frozenset:
    return frozenset(op for op in (getattr(torch.ops.aten, n, None) for n in names) if op is not None)


# The fused SDPA kernels return what their backward needs besides q, k, v (output, logsumexp, RNG state);
# SDPA's math fallback keeps its softmax probabilities (_safe_softmax). Keeping these means the attention
# core is not rerun. moelib's unfused CPU core (plain _softmax) is not in the list: it is rerun.
_ATTENTION_CORE = _ops("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                       "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                       "_scaled_dot_product_fused_attention_overrideable", "_safe_softmax")


def _attention_core_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op.overloadpacket in _ATTENTION_CORE else CheckpointPolicy.PREFER_RECOMPUTE


keep_attention_core = functools.partial(create_selective_checkpoint_contexts, _attention_core_policy)
keep_attention_core.__doc__ = "``checkpoint(keep=...)``: keep the attention core's results, recompute the rest."


# ---- SwiGLU -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwiGLUCache:
    """How a recomputed SwiGLU keeps gate and up: as they are, or (``quantize`` set: an FP8 backend's
    kernels' quantize) in E4M3 with 1×128 tiles."""

    quantize: Callable | None = None
    pow2_scale: bool = False


def scale_rows(out: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    """out [S, I] with row s multiplied by probs[s] (the routed expert's gate value) and rounded once to out's
    dtype; out itself when probs is None."""
    return out if probs is None else (out * probs.unsqueeze(-1)).to(out.dtype)


def _swiglu(gate: torch.Tensor, up: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    return scale_rows(F.silu(gate) * up, probs)


class _Fp8GateUp:
    """Gate and up in E4M3 (1×128 tiles): what a recomputed SwiGLU keeps, read again by its backward and by
    the next GEMM's (``output``: V3 recomputes SwiGLU's output for the down projection's weight gradient
    instead of keeping that GEMM's FP8 input too)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, probs: torch.Tensor | None, cache: SwiGLUCache):
        self.meta = [(t.shape, t.dtype) for t in (gate, up)]
        self.probs = None if probs is None else probs.detach()
        self.saved = []
        for t, name in ((gate, "SwiGLU gate"), (up, "SwiGLU up")):
            self.saved.append(cache.quantize(t.reshape(-1, t.shape[-1]), (1, fp8.TILE),
                                             pow2_scale=cache.pow2_scale, name=name))

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(fp8.dequantize(data, scale, (1, fp8.TILE), dtype).view(shape)
                     for (data, scale), (shape, dtype) in zip(self.saved, self.meta))

    def output(self) -> torch.Tensor:
        return _swiglu(*self.inputs(), self.probs)


class _RecomputedSwiGLU(torch.autograd.Function):
    """silu(gate) * up (rows scaled by ``probs`` if given) keeping only gate, up and probs (``kept`` gets the
    _Fp8GateUp when gate and up are kept in FP8); backward recomputes the product and runs autograd on it,
    so probs' gradient <grad, silu(gate) * up> needs no copy of the product."""

    @staticmethod
    def forward(ctx, gate, up, probs, cache: SwiGLUCache, kept: list):
        out = _swiglu(gate, up, probs)
        ctx.fp8 = cache.quantize is not None and gate.numel() > 0
        if ctx.fp8:
            ctx.gate_up = _Fp8GateUp(gate, up, probs, cache)
            kept.append(ctx.gate_up)
        else:
            ctx.save_for_backward(gate, up, probs)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.fp8:
            (gate, up), probs = ctx.gate_up.inputs(), ctx.gate_up.probs
        else:
            gate, up, probs = ctx.saved_tensors
        inputs = [t.detach().requires_grad_() for t in (gate, up) + ((probs,) if probs is not None else ())]
        with torch.enable_grad():
            out = _swiglu(*inputs[:2], inputs[2] if probs is not None else None)
        grads = torch.autograd.grad(out, inputs, grad)
        return grads[0], grads[1], grads[2] if probs is not None else None, None, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, cache: SwiGLUCache | None = None) -> torch.Tensor:
    """silu(gate) * up; with ``cache`` (set by the recompute policy) only gate and up are kept for backward."""
    return swiglu_again(gate, up, cache)[0]


def swiglu_again(gate: torch.Tensor, up: torch.Tensor, cache: SwiGLUCache | None = None,
                 probs: torch.Tensor | None = None) -> tuple[torch.Tensor, Callable[[], torch.Tensor] | None]:
    """(``swiglu(gate, up, cache)`` with row s scaled by ``probs[s]`` when given (a routed expert's gate
    value, folded in before the down projection so that the combine is a plain sum), a function recomputing
    it from the FP8 copies of gate and up when they are kept so, else None): the next GEMM may keep that
    function instead of its input."""
    if should_recompute(cache is not None):
        kept: list[_Fp8GateUp] = []
        out = _RecomputedSwiGLU.apply(gate, up, probs, cache, kept)
        return out, (kept[0].output if kept else None)
    return _swiglu(gate, up, probs), None


# ---- a Linear that keeps a recomputation of its input ---------------------------------------------------


class _LinearInputAgain(torch.autograd.Function):
    """F.linear(x, weight) keeping ``again`` (a function returning x) instead of x; backward reruns F.linear on
    the recomputed x and takes autograd's own gradients of it, so they are those of F.linear, bit for bit."""

    @staticmethod
    def forward(ctx, x, weight, again: Callable[[], torch.Tensor]):
        ctx.again = again
        ctx.save_for_backward(weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        x = ctx.again().detach().requires_grad_(ctx.needs_input_grad[0])
        weight = weight.detach().requires_grad_(ctx.needs_input_grad[1])
        wanted = [t for t in (x, weight) if t.requires_grad]
        with torch.enable_grad():
            out = F.linear(x, weight)
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (next(grads) if x.requires_grad else None), (next(grads) if weight.requires_grad else None), None


def linear_input_again(x: torch.Tensor, weight: torch.Tensor,
                       again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """F.linear(x, weight); with ``again`` (a function recomputing x in backward, e.g. RMSNorm.forward_again's)
    x is not kept for the weight's gradient."""
    if again is None or not torch.is_grad_enabled():
        return F.linear(x, weight)
    return _LinearInputAgain.apply(x, weight, again)
