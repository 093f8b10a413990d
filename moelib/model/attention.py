"""The attention core: softmax(q·kᵀ·scale, causal)·v, in high precision (bf16 under autocast, never FP8).

Two implementations of the same function. On CPU, while the scores fit in 64 MB, ``_UnfusedAttention``:
batched GEMMs and an fp32 softmax, with the backward written out. torch's CPU flash kernel took twice as
long forward + backward on the ``small`` preset (15.5 vs 6–7.5 ms a layer in bf16, 12 % of a training
step), and it needs v's head dim equal to q's. It keeps its probabilities for backward (heads · T values
per token), except in a selective-recompute region, which keeps nothing of it and reruns it
(moelib.model.recompute). Elsewhere, or for longer sequences, SDPA's fused kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelib.precision.linear import compute_dtype

_UNFUSED_MAX_SCORES = 1 << 24  # batch · heads · T², 64 MB in fp32: past it the fused kernel's memory wins


class _UnfusedAttention(torch.autograd.Function):
    """q, k [B, heads, T, d_qk], v [B, heads, T, d_v]. Keeps the probabilities in the compute dtype (as the
    GEMM with v consumes them) and the output; the backward is flash attention's, unblocked."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        b, h, t, _ = q.shape
        q3, k3, v3 = (x.reshape(b * h, t, x.shape[-1]) for x in (q, k, v))
        # Scale, mask and widen to fp32 in one pass (masked_fill_ alone took 3x as long here).
        mask = torch.full((t, t), float("-inf"), device=q.device).triu_(1)
        scores = torch.add(mask, torch.bmm(q3, k3.transpose(1, 2)), alpha=scale)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.bmm(probs, v3)
        ctx.save_for_backward(q3, k3, v3, probs, out)
        ctx.scale, ctx.bht = scale, (b, h, t)
        return out.view(b, h, t, -1)

    @staticmethod
    def backward(ctx, grad_out):
        q3, k3, v3, probs, out = ctx.saved_tensors
        grad_out = grad_out.reshape(out.shape).to(out.dtype)
        grad_v = torch.bmm(probs.transpose(1, 2), grad_out)
        # dS = P ⊙ (dP - rowsum(dO ⊙ O)) · scale, in fp32; masked positions have P = 0.
        grad_probs = torch.bmm(grad_out, v3.transpose(1, 2)).float()
        row = (grad_out.float() * out.float()).sum(dim=-1, keepdim=True)
        grad_scores = grad_probs.sub_(row).mul_(probs).mul_(ctx.scale).to(q3.dtype)
        grad_q, grad_k = torch.bmm(grad_scores, k3), torch.bmm(grad_scores.transpose(1, 2), q3)
        b, h, t = ctx.bht
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
