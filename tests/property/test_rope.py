"""RoPE (moelib.model.rope.apply_rope): the interleaved-pair rotation written half-split, to the bit."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.model.rope import apply_rope


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 9), heads=st.integers(1, 3), half=st.integers(1, 8),
       bf16=st.booleans())
def test_rotation_of_interleaved_pairs(seed, t, heads, half, bf16):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(2, t, heads, 2 * half, generator=gen).to(dtype)
    cos, sin = torch.randn(t, half, generator=gen), torch.randn(t, half, generator=gen)
    c, s = cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # pair i is (x[2i], x[2i + 1])
    expected = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    assert torch.equal(apply_rope(x, cos, sin), expected)
