"""The attention core: softmax(q·kᵀ·scale, causal)·v, in high precision (bf16 under autocast, never FP8).

Two implementations of the same function. On CPU, while the scores fit in 64 MB, ``_UnfusedAttention``:
batched GEMMs and a softmax computed in fp32 on scores held in the compute dtype, with the backward
written out. torch's CPU flash kernel took twice as long forward + backward on the ``small`` preset (15.5
vs 6–7.5 ms a layer in bf16, 12 % of a training step), and it needs v's head dim equal to q's. It keeps
its probabilities for backward (heads · T values per token), except in a selective-recompute region,
which keeps nothing of it and reruns it (moelib.model.recompute). Elsewhere, or for longer sequences,
SDPA's fused kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelib.precision.linear import compute_dtype

_UNFUSED_MAX_SCORES = 1 << 24  # batch · heads · T², 64 MB in fp32: past it the fused kernel's memory wins


class _UnfusedAttention(torch.autograd.Function):
    """q, k [B, heads, T, d_qk], v [B, heads, T, d_v]. Keeps the probabilities in the compute dtype, as the
    GEMM with v consumes them, and nothing of their size else."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        b, h, t, _ = q.shape
        q3, k3, v3 = (x.reshape(b * h, t, x.shape[-1]) for x in (q, k, v))
        # Scale and mask with the GEMM (baddbmm) and softmax straight to the compute dtype (fp32 inside the
        # kernel): fewer passes over the scores, none in fp32, than widening them first (28 % less time for
        # the core, fwd + bwd, small preset). As in transformers' eager attention, the scaled scores are
        # rounded to the compute dtype before the softmax.
        mask = torch.full((1, t, t), float("-inf"), device=q.device, dtype=q.dtype).triu_(1)
        probs = torch.softmax(torch.baddbmm(mask, q3, k3.transpose(1, 2), alpha=scale), dim=-1)
        ctx.save_for_backward(q3, k3, v3, probs)
        ctx.scale, ctx.bht = scale, (b, h, t)
        return torch.bmm(probs, v3).view(b, h, t, -1)

    @staticmethod
    def backward(ctx, grad_out):
        q3, k3, v3, probs = ctx.saved_tensors
        b, h, t = ctx.bht
        grad_out = grad_out.reshape(b * h, t, -1).to(probs.dtype)
        grad_v = torch.bmm(probs.transpose(1, 2), grad_out)
        # dS = P ⊙ (dP - rowsum(dP ⊙ P)) · scale: softmax's own backward kernel, one pass accumulating in
        # fp32 (masked positions have P = 0).
        grad_probs = torch.bmm(grad_out, v3.transpose(1, 2))
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(ctx.scale)
        grad_q, grad_k = torch.bmm(grad_scores, k3), torch.bmm(grad_scores.transpose(1, 2), q3)
        return grad_q.view(b, h, t, -1), grad_k.view(b, h, t, -1), grad_v.view(b, h, t, -1), None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale with a causal mask)·v. q, k [B, heads, T, d_qk], v [B, heads, T, d_v]."""
    b, h, t, d = q.shape
    if q.device.type == "cpu" and b * h * t * t <= _UNFUSED_MAX_SCORES:
        dtype = compute_dtype(q)  # what SDPA would run in here
        with torch.autocast("cpu", enabled=False):
            return _UnfusedAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), scale)
    # The fused kernels want v's head dim equal to q's; MLA's is smaller (V3: 128 vs 192), which would send
    # SDPA to its unfused math path. Zero columns in v leave the other output columns unchanged.
    pad = d - v.shape[-1]
    out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)) if pad > 0 else v, is_causal=True, scale=scale)
    return out[..., : v.shape[-1]] if pad > 0 else out
