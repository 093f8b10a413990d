"""SwiGLU feed-forward: the dense layers' FFN and the MoE's shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelib.precision.backends import Backend, Linear


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, backend: Backend):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, backend)
        self.up_proj = Linear(hidden, inter, backend)
        self.down_proj = Linear(inter, hidden, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
