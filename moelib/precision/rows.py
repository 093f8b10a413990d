"""Row layouts of the grouped GEMM and the row movements around it, each with a deterministic backward.

The routed experts' grouped GEMM takes rows grouped by expert. Where the backend asks for it
(``Backend.expert_row_multiple``: bf16 GEMMs on CPU, where oneDNN rebuilds a kernel for every new row
count), each group is padded to a multiple of rows, or every group to the largest (one batched GEMM,
``grouped.equal_group_size``): ``pad_groups`` computes that layout, ``pad_rows`` / ``take_rows`` move rows
into and out of it. ``gather_tokens`` copies tokens straight into it (one copy per chosen expert), and
``sum_slots`` reduces a token's k expert outputs. All of these are gathers with a
fixed-order backward (never an index-accumulate), so gradients are bit-for-bit deterministic; the custom
autograd functions exist because torch's own backwards of these gathers are slower on CPU (benchmarks/HISTORY.md).
Nothing here knows about experts or routing: the dispatchers (moelib.model.dispatch,
moelib.parallel.expert_parallel) use these to move tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PaddedRows:
    """Where rows grouped by expert go in a padded layout (``pad_groups``)."""
    rows: torch.Tensor     # [S]: each row's index in the padded layout
    counts: torch.Tensor   # [E]: padded rows per group
    source: torch.Tensor   # [P]: the row each padded row copies (0 for padding)
    padding: torch.Tensor  # the padding rows' indices


def pad_groups(counts: torch.Tensor, multiple: int, equal_up_to: float = 1.0) -> PaddedRows:
    """The layout of rows grouped by ``counts`` once each group is padded to a multiple of ``multiple``, or
    every group to the largest one's padded size when that makes at most ``equal_up_to`` times the rows."""
    padded = (counts + multiple - 1) // multiple * multiple
    if len(counts) > 1 and equal_up_to > 1:
        largest = padded.max()
        if int(largest) * len(counts) <= equal_up_to * int(padded.sum()):
            padded = largest.expand_as(padded).clone()
    shift = (torch.cumsum(padded, 0) - padded) - (torch.cumsum(counts, 0) - counts)
    n, total = int(counts.sum()), int(padded.sum())
    rows = torch.arange(n, device=counts.device) + shift.repeat_interleave(counts)
    source = torch.zeros(total, dtype=torch.long, device=counts.device).index_copy_(
        0, rows, torch.arange(n, device=counts.device))
    is_pad = torch.ones(total, dtype=torch.bool, device=counts.device).index_fill_(0, rows, False)
    return PaddedRows(rows, padded, source, is_pad.nonzero().squeeze(1))


def _place(x: torch.Tensor, source: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """x's rows in a padded layout (PaddedRows.source / .padding), zeros in the padding: a gather (a
    scatter into zeros with index_copy is slower on CPU)."""
    return x.index_select(0, source).index_fill_(0, padding, 0)


class _PadRows(torch.autograd.Function):
    """x's rows placed in a padded layout. Keeps only the layout for backward (index_select would keep x
    as well: one more copy of the routed tokens per MoE layer)."""

    @staticmethod
    def forward(ctx, x, layout):
        ctx.save_for_backward(layout.rows)
        return _place(x, layout.source, layout.padding)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return grad.index_select(0, rows), None


class _TakeRows(torch.autograd.Function):
    """y[rows] for distinct rows: expert rows out of their (padded) layout, or back out of expert order.
    ``source`` / ``padding`` are the inverse (PaddedRows'): the backward gathers the gradient rows back
    with ``source`` and zeros the ``padding`` rows no output took. index_select's own backward adds them
    into zeros with index_add, which is slower on CPU."""

    @staticmethod
    def forward(ctx, y, rows, source, padding):
        ctx.save_for_backward(source, padding)
        return y.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        return _place(grad, *ctx.saved_tensors), None, None, None


class _GatherTokens(torch.autograd.Function):
    """x[token_of_row]: each token copied once per chosen expert, to its rows of the experts' layout (zeros in
    the padding rows, if any). ``pos`` [N*k] is each (token, slot) pair's row. The backward is the combine
    with unit weights, a fixed-order sum over the k copies, so gradients are deterministic (an index
    backward accumulates the copies in a thread-dependent order)."""

    @staticmethod
    def forward(ctx, x, token_of_row, padding, pos, top_k):
        ctx.save_for_backward(pos)
        ctx.top_k = top_k
        return _place(x, token_of_row, padding)

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        return sum_slots(grad.index_select(0, pos).view(-1, ctx.top_k, grad.shape[-1])), None, None, None, None


def sum_slots(v: torch.Tensor) -> torch.Tensor:
    """v [N, k, H] -> sum over k in fp32, rounded once to v's dtype: what ``v.sum(1)`` computes, with one
    pass per slot (the strided reduction over k is slower on CPU). The combine: a token's k expert outputs,
    already scaled by their gate values, summed; nothing is kept for backward."""
    if torch.is_grad_enabled() and v.requires_grad:
        return _SumSlots.apply(v)
    return _sum_slots(v)


def _sum_slots(v: torch.Tensor) -> torch.Tensor:
    acc = v[:, 0].to(torch.float32, copy=True)
    for j in range(1, v.shape[1]):
        acc.add_(v[:, j])
    return acc.to(v.dtype)


class _SumSlots(torch.autograd.Function):
    """sum_slots with autograd: the backward copies the token's gradient to each of its k slots (autograd's
    own backward of the k slice-adds would build k zero-filled [N, k, H] gradients)."""

    @staticmethod
    def forward(ctx, v):
        ctx.top_k = v.shape[1]
        return _sum_slots(v)

    @staticmethod
    def backward(ctx, grad):
        return grad.unsqueeze(1).expand(-1, ctx.top_k, -1).contiguous()


def pad_rows(x: torch.Tensor, layout: PaddedRows) -> torch.Tensor:
    """x's rows (grouped as the layout's unpadded counts) placed in ``layout``, zeros in the padding."""
    return _PadRows.apply(x, layout)


def take_rows(y: torch.Tensor, rows: torch.Tensor, source: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """y[rows] for distinct rows; ``source`` / ``padding`` are the inverse, for the backward (see _TakeRows)."""
    return _TakeRows.apply(y, rows, source, padding)


def gather_tokens(x: torch.Tensor, token_of_row: torch.Tensor, padding: torch.Tensor, pos: torch.Tensor,
                  top_k: int) -> torch.Tensor:
    """x[token_of_row] with zeros in the ``padding`` rows; the backward sums a token's k copies (_GatherTokens)."""
    return _GatherTokens.apply(x, token_of_row, padding, pos, top_k)


def run_in_layout(fn, x: torch.Tensor, layout: PaddedRows, *per_row: torch.Tensor) -> torch.Tensor:
    """fn(rows, counts, *per_row) computed on x's rows (and each per-row tensor's) padded into ``layout``, the
    padding rows' outputs dropped: zero rows in, so the result and every gradient are as unpadded."""
    y = fn(pad_rows(x, layout), layout.counts, *(pad_rows(t, layout) for t in per_row))
    return take_rows(y, layout.rows, layout.source, layout.padding)
