"""RMSNorm, computed in fp32 whatever the activation dtype (V3 keeps norms in high precision)."""

from __future__ import annotations

import torch
from torch import nn

from moelib.model.recompute import checkpoint, should_recompute
from moelib.precision import apex


class RMSNorm(nn.Module):
    # Set by moelib.model.recompute.apply_recompute: keep only the input, recompute the rest in backward.
    recompute = False

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if should_recompute(self.recompute):
            return checkpoint(self.forward, x)
        fused = apex.fused_rms_norm(x, self.weight, self.eps)
        if fused is not None:
            return fused
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
