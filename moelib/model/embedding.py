"""The token-embedding lookup, with its gradient written straight into ``weight.grad``.

autograd's embedding backward builds a zero [vocab, hidden] fp32 gradient, adds the rows into it, and then
AccumulateGrad adds that whole tensor into ``.grad`` (for ``small``: 32 MB allocated, zeroed and read twice a
step for a few thousand rows). Here the rows are added into ``.grad`` directly (accumulate_weight_grad), as
the Linears' weight gradients are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    """weight[tokens] (as F.embedding), dE added into ``weight.grad``."""
    return _Embedding.apply(tokens, weight)
