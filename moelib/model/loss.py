"""The output head and its cross-entropy, fused, the softmax taken a few rows at a time.

``cross_entropy(F.linear(h, W).float(), labels)`` makes the [tokens, vocab] logits in the compute dtype,
an fp32 copy, an fp32 log-softmax saved for backward, and in backward a zero-filled gradient of the same
size and two more casts: on CPU those passes over the 16k-wide rows of the ``small`` preset cost as much
as the head's GEMMs. Here one GEMM makes the logits, then each chunk of rows goes from logits to
(softmax - one-hot) / n while it is in cache, written over the logits, and only that gradient, in the
compute dtype, is kept for backward: the numerics of the plain path (logits rounded to the compute dtype,
softmax in fp32, the gradient rounded back), less memory."""

from __future__ import annotations

import torch

from moelib.precision import kept, weight_cache
from moelib.precision.linear import compute_dtype
from moelib.precision.weight_grad import accumulate_weight_grad, add_mm_

IGNORE_INDEX = -100
# fp32 logits per chunk: 1 MB stays in a core's L2 (1-2 MB on current x86 server cores). 4 MB spilled it:
# the head's loss forward + backward (small preset, bf16) took 10-13 % longer.
_CHUNK_BYTES = 1 << 20


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, dtype):
        rows = h.reshape(-1, h.shape[-1]).to(dtype)
        w = weight_cache.cast(weight, dtype)
        labels = labels.reshape(-1)
        valid = labels != IGNORE_INDEX
        count = valid.sum()
        # Rows without a label add nothing; with none at all the loss is nan and every gradient zero, as
        # F.cross_entropy's mean.
        row_scale = valid / count.clamp(min=1)
        targets = labels.clamp(min=0).unsqueeze(1)
        need_grad = any(ctx.needs_input_grad[:2])
        # One GEMM for all rows (64-row GEMMs ran at 2/3 of its rate); the softmax goes chunk by chunk,
        # and each chunk's gradient overwrites the logits it came from.
        # Into memory kept from the last step on CPU: the logits are the largest tensor of a step.
        logits = torch.mm(rows, w.t(), out=kept.empty(weight, "logits", (rows.shape[0], w.shape[0]), dtype))
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        step = max(16, _CHUNK_BYTES // (4 * w.shape[0]))
        for s in range(0, rows.shape[0], step):
            e = min(s + step, rows.shape[0])
            chunk = logits[s:e].float()  # logits itself in fp32: then the in-place steps below write it
            target_logit = chunk.gather(1, targets[s:e])
            top = chunk.amax(dim=-1, keepdim=True)
            exp = chunk.sub_(top).exp_()  # one exp per logit serves the loss and the gradient
            sum_exp = exp.sum(dim=-1, keepdim=True)
            total += ((top + sum_exp.log() - target_logit).squeeze(1) * valid[s:e]).sum()
            if need_grad:
                scale = row_scale[s:e].unsqueeze(1)
                logits[s:e] = exp.mul_(scale / sum_exp).scatter_add_(1, targets[s:e], -scale)
        grad_logits = logits if need_grad else None
        ctx.save_for_backward(rows, w, grad_logits)
        ctx.weight, ctx.h_shape, ctx.h_dtype = weight, h.shape, h.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        rows, w, grad_logits = ctx.saved_tensors
        # The loss's gradient scales the small operand of each GEMM, never the [tokens, vocab] one: dX after
        # its GEMM in h's dtype; dW's rows before it, one rounding in the compute dtype (the size of the
        # rounding of the GEMM's own bf16 output).
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad_logits @ w).to(ctx.h_dtype).mul_(grad_loss).view(ctx.h_shape)
        if ctx.needs_input_grad[1]:
            scaled = rows * grad_loss.to(rows.dtype)
            grad_w = accumulate_weight_grad(ctx.weight, lambda g, accumulate: add_mm_(
                g, grad_logits.t(), scaled, accumulate))
        return grad_h, grad_w, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``labels`` (IGNORE_INDEX skips a position), the
    logits in the autocast dtype (or h's) and the softmax in fp32. h [..., H], weight [V, H], labels [...]."""
    dtype = compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, labels, dtype)
