"""Grouped matmul for routed experts: one GEMM over all experts' contiguous token groups.

``torch.nn.functional.grouped_mm`` does the work where its layout rules hold (16-byte aligned rows);
otherwise a loop over experts (never over tokens) computes the same thing. Backward is written out
because torch's own backward rejects the stride-0 gradients that reductions produce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm's layout rule: 16-byte aligned base, one of the two matrix dims unit-stride and the
    other (and any batch stride) a multiple of 16 bytes."""
    size = t.element_size()
    row, col = t.stride(-2), t.stride(-1)
    matrix_ok = (col == 1 and row * size % 16 == 0) or (row == 1 and col * size % 16 == 0)
    return t.data_ptr() % 16 == 0 and matrix_ok and all(s * size % 16 == 0 for s in t.stride()[:-2])


def _use_torch_grouped(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (hasattr(F, "grouped_mm") and a.dtype in (torch.float32, torch.bfloat16) and a.shape[0] > 0
            and _aligned(a) and _aligned(b))


def _mm_groups(a: torch.Tensor, b: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """out[s:e] = a[s:e] @ b[i] for each group i; a [S, K], b [E, K, N]."""
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for i, end in enumerate(offsets):
        if end > start:
            torch.mm(a[start:end], b[i], out=out[start:end])
        start = end
    return out


def _forward_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    if _use_torch_grouped(a, b):
        return F.grouped_mm(a, b, offs=offs)
    return _mm_groups(a, b, offsets)


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offs):
        offsets = offs.tolist()
        ctx.save_for_backward(x, weight, offs)
        ctx.offsets = offsets
        return _forward_mm(x, weight.transpose(-2, -1), offs, offsets)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offs = ctx.saved_tensors
        offsets = ctx.offsets
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _forward_mm(grad_out, weight, offs, offsets)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight)
            start = 0
            for i, end in enumerate(offsets):
                if end > start:
                    torch.mm(grad_out[start:end].t(), x[start:end], out=grad_w[i])
                else:
                    grad_w[i].zero_()
                start = end
        return grad_x, grad_w, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """y[rows of expert i] = x[rows of expert i] @ weight[i].T.

    x: [S, in] sorted by expert; weight: [E, out, in]; counts: [E] rows per expert (sum S).
    Under autocast both operands are cast to the autocast dtype, as a Linear would be.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
    else:
        weight = weight.to(x.dtype)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    with torch.autocast(device, enabled=False):
        return _GroupedLinear.apply(x, weight, offs)
