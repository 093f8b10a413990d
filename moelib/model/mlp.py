"""SwiGLU feed-forward: the dense layers' FFN and the MoE's shared experts."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moelib.model.recompute import SwiGLUCache, swiglu_again
from moelib.precision.backends import Backend, Linear
from moelib.precision.linear import compute_dtype, shared_input


class MLP(nn.Module):
    # Set by moelib.train.recompute.apply_recompute: keep only SwiGLU's inputs, recompute its product.
    recompute_swiglu: SwiGLUCache | None = None

    def __init__(self, hidden: int, inter: int, backend: Backend):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, backend)
        self.up_proj = Linear(hidden, inter, backend)
        self.down_proj = Linear(inter, hidden, backend)

    def forward(self, x: torch.Tensor, x_again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """``x_again``: a function recomputing x in backward (the norm's, when it recomputes). Under the FP8
        SwiGLU cache the gate and up projections keep it instead of their FP8 input: their weight gradients
        then tile the recomputed input once instead of re-tiling the forward's FP8 copy (rounding only)."""
        # One copy of the input serves both projections, as in V3's fused gate+up GEMM: cast once to the
        # compute dtype, quantised once under FP8, and saved once for backward (unless kept as x_again).
        dtype = compute_dtype(x)
        x = x.to(dtype)
        fp8_cache = self.recompute_swiglu is not None and self.recompute_swiglu.quantize is not None
        again = (lambda: x_again().to(dtype)) if x_again is not None and fp8_cache else None
        with shared_input(x):
            gate, up = self.gate_proj(x, input_again=again), self.up_proj(x, input_again=again)
        hidden, again = swiglu_again(gate, up, self.recompute_swiglu)
        return self.down_proj(hidden, input_again=again)
