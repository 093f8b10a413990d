"""The token-embedding lookup, with its gradient written straight into ``weight.grad``.

autograd's embedding backward builds a zero [vocab, hidden] fp32 gradient, adds the rows into it, and then
AccumulateGrad adds that whole tensor into ``.grad`` (for ``small``: 32 MB allocated, zeroed and read twice a
step for a few thousand rows). Here the rows are added into ``.grad`` directly (accumulate_weight_grad), as
the Linears' weight gradients are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelib.precision.fp8 import TILE
from moelib.precision.weight_grad import accumulate_weight_grad


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, weight):
        ctx.save_for_backward(tokens)
        ctx.weight = weight
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (tokens,) = ctx.saved_tensors
        rows = grad_out.reshape(-1, grad_out.shape[-1])

        def write_into(grad: torch.Tensor, accumulate: bool) -> None:
            if not accumulate:
                grad.zero_()
            grad.index_add_(0, tokens.reshape(-1), rows.to(grad.dtype))

        return None, accumulate_weight_grad(ctx.weight, write_into)


def embedding_lookup(tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight[tokens] (as F.embedding), dE added into ``weight.grad``. An FP8-resident table (inference,
    moelib.inference.fp8_weights: 128x128 block scales in ``scale_inv``) gives its rows dequantised to bf16."""
    if hasattr(weight, "scale_inv"):
        return fp8_rows(tokens, weight, weight.scale_inv)
    return _Embedding.apply(tokens, weight)


def fp8_rows(tokens: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """The rows ``tokens`` of an E4M3 table [V, H] dequantised to bf16; the other rows are never touched."""
    scale = scale_inv[tokens // TILE].repeat_interleave(TILE, -1)[..., :weight.shape[1]]
    return (weight[tokens].float() * scale).to(torch.bfloat16)
