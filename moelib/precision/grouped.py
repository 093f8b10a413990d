"""High-precision (fp32 / bf16) GEMMs of the Linears and the routed experts, with deferrable weight grads.

Grouped matmul for routed experts: one GEMM over all experts' contiguous token groups.

``torch.nn.functional.grouped_mm`` does the work where its layout rules hold (16-byte aligned rows);
otherwise a loop over experts (never over tokens) computes the same thing. Backward is written out
because torch's own backward rejects the stride-0 gradients that reductions produce.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moelib.precision import weight_cache
from moelib.precision.linear import compute_dtype, record_output_again
from moelib.precision.weight_grad import accumulate_weight_grad, add_mm_, write_


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm's layout rule: 16-byte aligned base, one of the two matrix dims unit-stride and the
    other (and any batch stride) a multiple of 16 bytes."""
    size = t.element_size()
    row, col = t.stride(-2), t.stride(-1)
    matrix_ok = (col == 1 and row * size % 16 == 0) or (row == 1 and col * size % 16 == 0)
    return t.data_ptr() % 16 == 0 and matrix_ok and all(s * size % 16 == 0 for s in t.stride()[:-2])


def _use_torch_grouped(a: torch.Tensor, b: torch.Tensor, offsets: list[int]) -> bool:
    return (hasattr(F, "grouped_mm") and a.dtype in (torch.float32, torch.bfloat16) and a.shape[0] > 0
            and not (a.device.type == "cpu" and _mostly_empty(offsets)) and _aligned(a) and _aligned(b))


def _mostly_empty(offsets: list[int]) -> bool:
    """Fewer than half the groups have rows (decode): grouped_mm's CPU fallback still runs a GEMM for
    every group, the loop below only for those with rows."""
    filled = sum(end > start for start, end in zip([0, *offsets], offsets))
    return 2 * filled < len(offsets)


def _mm_groups(a: torch.Tensor, b: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """out[s:e] = a[s:e] @ b[i] for each group i; a [S, K], b [E, K, N]."""
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for i, end in enumerate(offsets):
        if end > start:
            torch.mm(a[start:end], b[i], out=out[start:end])
        start = end
    return out


def equal_group_size(offsets: list[int]) -> int | None:
    """The common row count when every group has the same (non-zero) number of rows, else None."""
    size = offsets[0] if offsets else 0
    return size if size > 0 and all(end == size * (i + 1) for i, end in enumerate(offsets)) else None


def _forward_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    size = equal_group_size(offsets)
    if size is not None:
        # One batched GEMM: on CPU ~1.6x the rate of a GEMM per group at ~150 rows (bf16, oneDNN).
        return torch.bmm(a.view(len(offsets), size, a.shape[-1]), b).view(a.shape[0], b.shape[-1])
    if _use_torch_grouped(a, b, offsets):
        return F.grouped_mm(a, b, offs=offs)
    return _mm_groups(a, b, offsets)


def expert_row_multiple(x: torch.Tensor) -> int:
    """The multiple each expert's row count is padded to before the grouped GEMMs on ``x``.

    On CPU, oneDNN builds (JIT-compiles) a bf16 GEMM for every new row count and caches 1024 of them.
    Routed experts' row counts change every step, so unpadded most of the ~1,300 expert GEMMs of a
    ``small`` step were rebuilt (0.3 ms each, measured); padded to 32 rows only a few dozen shapes
    exist. fp32 GEMMs (MKL) and GPUs gain nothing from it, so they get 1.
    """
    return 32 if x.device.type == "cpu" and compute_dtype(x) == torch.bfloat16 else 1


class _GroupedLinear(torch.autograd.Function):
    """The weight arrives as the master parameter and is cast here, so its gradient can be deferred to a
    later W step (WeightGradStore) and accumulated straight into ``weight.grad``."""

    @staticmethod
    def forward(ctx, x, weight, offs, dtype):
        x_c, w_c = x.to(dtype), weight_cache.cast(weight, dtype)
        offsets = offs.tolist()
        ctx.save_for_backward(x_c, w_c, offs)
        ctx.offsets, ctx.weight, ctx.x_dtype = offsets, weight, x.dtype
        return _forward_mm(x_c, w_c.transpose(-2, -1), offs, offsets)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, offs = ctx.saved_tensors
        offsets = ctx.offsets
        grad_out = grad_out.contiguous().to(x.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _forward_mm(grad_out, weight, offs, offsets).to(ctx.x_dtype)

        def write_weight_grad(grad_w: torch.Tensor, accumulate: bool) -> None:
            size = equal_group_size(offsets)
            if size is not None:
                e = len(offsets)
                grad_e = grad_out.view(e, size, -1).transpose(1, 2)
                write_(grad_w, torch.bmm(grad_e, x.view(e, size, -1)), accumulate)
                return
            start = 0
            for i, end in enumerate(offsets):
                if end > start:
                    add_mm_(grad_w[i], grad_out[start:end].t(), x[start:end], accumulate)
                elif not accumulate:
                    grad_w[i].zero_()  # an expert without tokens
                start = end

        if ctx.needs_input_grad[1]:
            grad_w = accumulate_weight_grad(ctx.weight, write_weight_grad)
        return grad_x, grad_w, None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """y[rows of expert i] = x[rows of expert i] @ weight[i].T.

    x: [S, in] sorted by expert; weight: [E, out, in]; counts: [E] rows per expert (sum S).
    Under autocast both operands are cast to the autocast dtype, as a Linear would be.
    """
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    dtype = compute_dtype(x)
    if not torch.is_grad_enabled():  # inference: the forward on plain ops, without autograd's bookkeeping
        return _forward_mm(x.to(dtype), weight_cache.cast(weight, dtype).transpose(-2, -1), offs, offs.tolist())
    with torch.autocast(x.device.type, enabled=False):
        return _GroupedLinear.apply(x, weight, offs, dtype)


class _Linear(torch.autograd.Function):
    """F.linear (bias-free) whose weight gradient can be deferred, as _GroupedLinear."""

    @staticmethod
    def forward(ctx, x, weight, dtype):
        x_c, w_c = x.to(dtype), weight_cache.cast(weight, dtype)
        ctx.save_for_backward(x_c, w_c)
        ctx.weight, ctx.x_dtype = weight, x.dtype
        record_output_again(functools.partial(_linear_again, x_c, w_c))
        return F.linear(x_c, w_c)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        grad_x = (grad_out @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = accumulate_weight_grad(ctx.weight, lambda g, accumulate: add_mm_(
                g, grad_out.reshape(-1, grad_out.shape[-1]).t(), x.reshape(-1, x.shape[-1]), accumulate))
        return grad_x, grad_w, None


def _linear_again(x_c: torch.Tensor, w_c: torch.Tensor) -> torch.Tensor:
    """_Linear's forward GEMM again, from its kept operands."""
    with torch.no_grad(), torch.autocast(x_c.device.type, enabled=False):
        return F.linear(x_c, w_c)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ weight.T in the autocast dtype (or x's), with a deferrable weight gradient."""
    dtype = compute_dtype(x)
    if not torch.is_grad_enabled():  # inference: a plain GEMM
        return F.linear(x.to(dtype), weight_cache.cast(weight, dtype))
    with torch.autocast(x.device.type, enabled=False):
        return _Linear.apply(x, weight, dtype)
