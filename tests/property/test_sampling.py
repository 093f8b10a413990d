"""Next-token distributions: temperature, top-k and top-p keep the right tokens with the right mass."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.inference.sampling import distribution
from moelib.inference.speculative import residual

logits_st = st.lists(st.floats(-8, 8, width=32), min_size=2, max_size=24).map(torch.tensor)


@settings(max_examples=60, deadline=None)
@given(logits_st, st.floats(0.1, 3.0), st.integers(0, 30), st.floats(0.05, 1.0))
def test_distribution_keeps_the_top_tokens_renormalised(logits, temperature, top_k, top_p):
    p = distribution(logits, temperature, top_k, top_p)
    assert torch.isclose(p.sum(), torch.tensor(1.0), atol=1e-5)
    kept = p > 0
    full = torch.softmax(logits.double() / temperature, -1)
    # The kept tokens are the most likely ones, in at most top_k of them, proportional to the softmax.
    if (~kept).any():
        assert full[kept].min() >= full[~kept].max() - 1e-6
    if 0 < top_k < len(logits):  # ties with the k-th logit stay
        assert int(kept.sum()) <= int((logits >= logits.topk(top_k).values[-1]).sum())
    ratio = p[kept].double() / full[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
    # Nucleus: dropping the least likely kept token would leave less than top_p of the top-k mass.
    if top_p < 1 and int(kept.sum()) > 1:
        top = full.clone()
        if 0 < top_k < len(logits):
            top[full < full.topk(top_k).values[-1]] = 0
        top = top / top.sum()
        assert float(top[kept].sum() - top[kept].min()) < top_p + 1e-5


@given(logits_st)
def test_greedy_is_one_hot_on_the_argmax(logits):
    p = distribution(logits, 0.0)
    assert p.sum() == 1 and p[logits.argmax()] == 1


@settings(max_examples=60, deadline=None)
@given(logits_st, st.integers(0, 2**31 - 1))
def test_draft_then_residual_reproduces_the_target(logits, seed):
    """q(x)·min(1, p/q) + P(reject)·residual(x) = p(x): the speculative rule's marginal, for any q."""
    p = torch.softmax(logits.double(), -1)
    q = torch.softmax(torch.randn(len(logits), generator=torch.Generator().manual_seed(seed)).double(), -1)
    accept = torch.minimum(q, p)
    out = accept + (1 - accept.sum()) * residual(p, q)
    assert torch.allclose(out, p, atol=1e-9)
