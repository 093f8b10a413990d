"""The fused, chunked head + cross-entropy (moelib.model.loss) against F.cross_entropy(F.linear(...)) in
float64: the loss, dX and dW, over chunk boundaries, ignored positions and loss scales."""

from __future__ import annotations

import math
from unittest import mock

import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moelib.model import loss as loss_mod
from moelib.model.loss import IGNORE_INDEX, linear_cross_entropy
from moelib.precision.weight_grad import WeightGradStore


def reference(h, w, labels, scale):
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(F.linear(h64, w64).flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX)
    (ref * scale).backward()
    return ref.detach(), h64.grad, w64.grad


def problem(seed, rows, hidden, vocab, ignored):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2, rows, hidden, generator=gen).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) / math.sqrt(hidden)).requires_grad_()
    labels = torch.randint(0, vocab, (2, rows), generator=gen)
    labels[torch.rand(2, rows, generator=gen) < ignored] = IGNORE_INDEX
    return h, w, labels


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 40), hidden=st.integers(1, 24),
       vocab=st.integers(2, 70), ignored=st.sampled_from([0.0, 0.3]), chunk_rows=st.integers(1, 50),
       scale=st.sampled_from([1.0, 0.3, 2.5]))
@example(seed=0, rows=33, hidden=8, vocab=64, ignored=0.3, chunk_rows=16, scale=1.0)  # 3 chunks, the last short
def test_fp32_matches_cross_entropy_of_the_logits(seed, rows, hidden, vocab, ignored, chunk_rows, scale):
    h, w, labels = problem(seed, rows, hidden, vocab, ignored)
    # The chunk is max(16, bytes / (4 * vocab)) rows: set the bytes so it is chunk_rows (or 16).
    with mock.patch.object(loss_mod, "_CHUNK_BYTES", 4 * vocab * chunk_rows):
        loss = linear_cross_entropy(h, w, labels)
    (loss * scale).backward()
    ref, dh, dw = reference(h, w, labels, scale)
    if (labels == IGNORE_INDEX).all():
        assert loss.isnan() and ref.isnan()
        assert not h.grad.any() and not w.grad.any()
        return
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), dh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), dw, rtol=1e-4, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 40), vocab=st.integers(2, 300))
def test_bf16_matches_the_unfused_bf16_path(seed, rows, vocab):
    """Under autocast: the logits rounded to bf16 and the softmax in fp32, as F.linear then .float() would,
    so the loss is the unfused one's to fp32 rounding and the gradients to bf16's."""
    h, w, labels = problem(seed, rows, 32, vocab, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, labels)
        plain = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    if (labels == IGNORE_INDEX).all():
        return
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(plain, (h, w))
    loss.backward()
    for mine, theirs in zip((h.grad, w.grad), grads):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=4 * 2**-8 * theirs.abs().max().item())


def test_weight_grad_deferred_and_no_grad_forward():
    h, w, labels = problem(0, 20, 8, 50, 0.0)
    ref, dh, dw = reference(h, w, labels, 1.0)
    WeightGradStore.clear()
    with WeightGradStore.deferred():
        linear_cross_entropy(h, w, labels).backward()
    assert w.grad is None and h.grad is not None  # dX at once, dW in the W step
    WeightGradStore.pop_all()
    torch.testing.assert_close(w.grad.double(), dw, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, labels).double(), ref, rtol=1e-5, atol=1e-6)
