"""Shared by the interop tests."""

import torch


def randomize(model, seed: int) -> None:
    """Make norms and router biases non-trivial, so a swapped or missing tensor cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        for moe in model.moe_layers().values():
            moe.gate.e_score_correction_bias.copy_(0.1 * torch.randn(moe.num_experts, generator=g))
