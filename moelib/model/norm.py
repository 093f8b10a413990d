"""RMSNorm, computed in fp32 whatever the activation dtype (V3 keeps norms in high precision)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moelib.model.recompute import checkpoint, should_recompute
from moelib.precision import apex


class _RMSNorm(torch.autograd.Function):
    """weight · round(x·rsqrt(mean(x²) + eps)), x in fp32 and rounded back to its dtype (as V3's and
    transformers' norms), with the backward written out: autograd's own chain through pow, mean, rsqrt, two
    products and a cast takes ~14 full passes over the activations in backward, this one 9; it also keeps
    x in its own dtype where autograd kept an fp32 copy of a bf16 input."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * r).to(x.dtype)
        ctx.save_for_backward(x, weight, r, normed)
        return weight * normed

    @staticmethod
    def backward(ctx, grad):
        x, weight, r, normed = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * normed).reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # The gradient of the rounded product comes in its dtype, as autograd would hand it over; then
            # d(x·r)/dx with r = (mean(x²) + eps)^-1/2: g·r − x·r³·mean(g·x).
            g = (grad * weight).to(normed.dtype)
            xf = x.float()
            dot = (g * xf).sum(-1, keepdim=True)
            grad_x = (g * r - xf * (dot * r.pow(3) / x.shape[-1])).to(x.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    # Set by moelib.train.recompute.apply_recompute: keep only the input, recompute the rest in backward.
    recompute = False

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if should_recompute(self.recompute):
            return checkpoint(self.forward, x)
        if not torch.is_grad_enabled():  # inference: torch's rms_norm gives the same x·rsqrt(mean(x²) + eps)
            return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)
        return self._train_forward(x)

    def forward_again(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[], torch.Tensor] | None]:
        """(``forward(x)``, a function recomputing that output bit for bit when this norm recomputes, else
        None): a consumer may keep the function instead of the output, since the recompute region keeps x."""
        out = self.forward(x)
        return out, (functools.partial(self._again, x) if should_recompute(self.recompute) else None)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = apex.fused_rms_norm(x, self.weight, self.eps)
        return fused if fused is not None else _RMSNorm.apply(x, self.weight, self.eps)

    def _again(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._train_forward(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
