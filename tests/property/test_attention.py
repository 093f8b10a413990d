"""The attention core (moelib.model.attention): the unfused CPU path and SDPA's against float64, forward
and backward, with MLA's unequal q and v head dims."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.model import attention
from moelib.model.attention import causal_attention


def inputs(seed, b, h, t, d, dv):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, n, generator=gen).requires_grad_() for n in (d, d, dv)]


def reference(q, k, v, scale, grad):
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    out.backward(grad.double())
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("path", ["unfused", "sdpa"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 2), h=st.integers(1, 3), t=st.integers(1, 40),
       d=st.integers(1, 24), dv_less=st.integers(0, 8))
def test_fp32_matches_float64(path, seed, b, h, t, d, dv_less):
    dv = max(1, d - dv_less)
    q, k, v = inputs(seed, b, h, t, d, dv)
    grad = torch.randn(b, h, t, dv, generator=torch.Generator().manual_seed(seed + 1))
    limit = attention._UNFUSED_MAX_SCORES if path == "unfused" else 0
    with mock.patch.object(attention, "_UNFUSED_MAX_SCORES", limit):
        out = causal_attention(q, k, v, d ** -0.5)
    out.backward(grad)
    ref = reference(q, k, v, d ** -0.5, grad)
    for mine, theirs in zip((out, q.grad, k.grad, v.grad), ref):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-4, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(2, 64))
def test_bf16_within_bf16_error_of_float64(seed, t):
    """Under autocast: bf16 GEMMs, the softmax in fp32, the probabilities rounded to bf16 for the GEMM with
    v (as flash kernels do): errors of a few bf16 ulps of the values' scale."""
    q, k, v = inputs(seed, 2, 2, t, 24, 16)
    grad = torch.randn(2, 2, t, 16, generator=torch.Generator().manual_seed(seed + 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_attention(q, k, v, 24 ** -0.5)
    assert out.dtype == torch.bfloat16
    out.backward(grad)
    ref = reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), 24 ** -0.5, grad.bfloat16())
    for mine, theirs in zip((out, q.grad, k.grad, v.grad), ref):
        err = (mine.double() - theirs).abs().max().item()
        assert err <= 8 * 2**-8 * (1 + theirs.abs().max().item()), err
