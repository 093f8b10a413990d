"""SwiGLU feed-forward: the dense layers' FFN and the MoE's shared experts."""

from __future__ import annotations

import torch
from torch import nn

from moelib.model.recompute import SwiGLUCache, swiglu
from moelib.precision.backends import Backend, Linear


class MLP(nn.Module):
    # Set by moelib.model.recompute.apply_recompute: keep only SwiGLU's inputs, recompute its product.
    recompute_swiglu: SwiGLUCache | None = None

    def __init__(self, hidden: int, inter: int, backend: Backend):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, backend)
        self.up_proj = Linear(hidden, inter, backend)
        self.down_proj = Linear(inter, hidden, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.recompute_swiglu))
