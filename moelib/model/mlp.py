"""SwiGLU feed-forward: the dense layers' FFN and the MoE's shared experts."""

from __future__ import annotations

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One copy of the input serves both projections, as in V3's fused gate+up GEMM: cast once to the
        # compute dtype, quantised once under FP8, and saved once for backward.
        x = x.to(compute_dtype(x))
        with shared_input(x):
            gate, up = self.gate_proj(x), self.up_proj(x)
        hidden, again = swiglu_again(gate, up, self.recompute_swiglu)
        return self.down_proj(hidden, input_again=again)
