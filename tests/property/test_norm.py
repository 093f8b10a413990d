"""RMSNorm's written-out backward against autograd's own, through the textbook formula (V3's and transformers'
norm: fp32 inside, the normalised value rounded to the input's dtype before the weight)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.model.norm import RMSNorm


def textbook(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), dim=st.integers(1, 70), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), eps=st.sampled_from([1e-6, 1e-2]), seed=st.integers(0, 2**16))
def test_forward_equals_and_backward_matches_autograd(rows, dim, dtype, scale, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, rows, dim, generator=gen) * scale).to(dtype)
    norm = RMSNorm(dim, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=gen))
    weight = norm.weight.detach().clone().requires_grad_()
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = norm(ours)
    ref = textbook(theirs, weight, eps)
    assert y.dtype == ref.dtype and torch.equal(y, ref)
    grad = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    y.backward(grad)
    ref.backward(grad)
    # Both round dx once, to x's dtype, from fp32 values that differ at most in the order of a few fp32 ops.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(ours.grad, theirs.grad, **tol)
    torch.testing.assert_close(norm.weight.grad, weight.grad, rtol=1e-5, atol=1e-5)


def test_gradients_of_only_one_input():
    """Each gradient alone (a frozen weight, an input that needs none) equals the textbook one."""
    x = torch.randn(3, 16)
    norm = RMSNorm(16)
    norm(x).sum().backward()  # the weight's only
    weight = norm.weight.detach().clone().requires_grad_()
    textbook(x, weight, norm.eps).sum().backward()
    torch.testing.assert_close(norm.weight.grad, weight.grad, rtol=1e-6, atol=1e-6)
    norm.weight.requires_grad_(False)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    norm(ours).sum().backward()  # x's only
    textbook(theirs, norm.weight, norm.eps).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)
