"""RMSNorm, computed in fp32 whatever the activation dtype (V3 keeps norms in high precision)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moelib.model.recompute import checkpoint, should_recompute
from moelib.precision import apex


def _rms_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight · normed, r = rsqrt(mean(x²) + eps), normed = round(x·r)) with x in fp32."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    normed = (xf * r).to(x.dtype)
    return weight * normed, r, normed


def _rms_backward(needs_input_grad, grad, x, weight, r, normed):
    grad_x = grad_w = None
    if needs_input_grad[1]:
        grad_w = (grad * normed).reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
    if needs_input_grad[0]:
        # The gradient of the rounded product comes in its dtype, as autograd would hand it over; then
        # d(x·r)/dx with r = (mean(x²) + eps)^-1/2: g·r − x·r³·mean(g·x).
        g = (grad * weight).to(normed.dtype)
        xf = x.float()
        dot = (g * xf).sum(-1, keepdim=True)
        grad_x = (g * r - xf * (dot * r.pow(3) / x.shape[-1])).to(x.dtype)
    return grad_x, grad_w


class _RMSNorm(torch.autograd.Function):
    """weight · round(x·rsqrt(mean(x²) + eps)), x in fp32 and rounded back to its dtype (as V3's and
    transformers' norms), with the backward written out: autograd's own chain through pow, mean, rsqrt, two
    products and a cast takes ~14 full passes over the activations in backward, this one 9; it also keeps
    x in its own dtype where autograd kept an fp32 copy of a bf16 input."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        out, r, normed = _rms_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, r, normed)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, r, normed = ctx.saved_tensors
        return *_rms_backward(ctx.needs_input_grad, grad, x, weight, r, normed), None


class _RMSNormInputAgain(torch.autograd.Function):
    """_RMSNorm keeping only ``again``, a function returning x, from which backward recomputes everything."""

    @staticmethod
    def forward(ctx, x, weight, eps, again: Callable[[], torch.Tensor]):
        ctx.save_for_backward(weight)
        ctx.eps, ctx.again = eps, again
        return _rms_forward(x, weight, eps)[0]

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        x = ctx.again()
        _, r, normed = _rms_forward(x, weight.detach(), ctx.eps)
        return *_rms_backward(ctx.needs_input_grad, grad, x, weight, r, normed), None, None


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
        fused = apex.fused_rms_norm(x, self.weight, self.eps)
        if fused is not None:
            return fused
        if not torch.is_grad_enabled():  # inference: torch's rms_norm gives the same x·rsqrt(mean(x²) + eps)
            return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)
        return _RMSNorm.apply(x, self.weight, self.eps)

    def forward_again(self, x: torch.Tensor, x_again: Callable[[], torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, Callable[[], torch.Tensor] | None]:
        """(``forward(x)``, a function recomputing that output bit for bit when this norm recomputes, else
        None): a consumer may keep the function instead of the output, since the recompute region keeps x.
        With ``x_again`` (a function recomputing x) the norm keeps that instead of x."""
        if not should_recompute(self.recompute):
            return self.forward(x), None
        if x_again is None or apex.applies(x):
            return self.forward(x), functools.partial(self._again, x)
        out = _RMSNormInputAgain.apply(x, self.weight, self.eps, x_again)
        return out, lambda: self._again(x_again())

    def _again(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward's output again, without autograd."""
        with torch.no_grad():
            fused = apex.fused_rms_norm(x, self.weight, self.eps)
            return fused if fused is not None else _rms_forward(x, self.weight, self.eps)[0]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
