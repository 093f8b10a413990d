"""Property tests of the routed-expert computation: grouped_linear, GroupedExperts, LocalDispatcher and
the MoE layer, each against a straightforward float64 reference (loops over experts and tokens).

Sizes are drawn both as multiples of 8 (torch's grouped_mm path) and odd (the per-expert loop
fallback); ``test_both_grouped_paths_are_exercised`` checks that both paths really run.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moelib.config import ModelConfig
from moelib.model.dispatch import LocalDispatcher
from moelib.model.moe import GroupedExperts, MoE
from moelib.model.recompute import SwiGLUCache
from moelib.precision import grouped
from moelib.precision.backends import get_backend
from moelib.precision.grouped import grouped_linear
from moelib.precision.rows import _PadRows, _TakeRows, pad_groups, sum_slots

SEEDS = st.integers(0, 2**31 - 1)
# Feature sizes: multiples of 8 take torch's grouped_mm, the others the loop over experts.
SIZES = st.one_of(st.sampled_from([8, 16, 24]), st.integers(1, 21))
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


@st.composite
def expert_counts(draw, max_experts: int = 5, allow_empty_batch: bool = True):
    """Rows per expert: random (zeros included), one expert taking every row, all alike (one batched
    GEMM), or no rows at all."""
    n_experts = draw(st.integers(1, max_experts))
    kind = draw(st.sampled_from(["random", "one_takes_all", "equal", "empty"] if allow_empty_batch
                                else ["random", "one_takes_all", "equal"]))
    if kind == "equal":
        counts = [draw(st.integers(1, 6))] * n_experts
    elif kind == "random":
        counts = draw(st.lists(st.integers(0, 6), min_size=n_experts, max_size=n_experts))
        if sum(counts) == 0:
            counts[-1] = 1
    elif kind == "one_takes_all":
        counts = [0] * n_experts
        counts[draw(st.integers(0, n_experts - 1))] = draw(st.integers(1, 13))
    else:
        counts = [0] * n_experts
    return counts


def segments(counts: list[int]):
    start = 0
    for e, c in enumerate(counts):
        yield e, range(start, start + c)
        start += c


def init_(module: torch.nn.Module, gen: torch.Generator, scale: float = 1.0) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale / math.sqrt(p.shape[-1]))


def silu64(v: torch.Tensor) -> torch.Tensor:
    return v / (1 + torch.exp(-v))


def swiglu64(x, gate_w, up_w, down_w):
    """Plain SwiGLU on one token vector x [H], float64, matrix-vector products only."""
    return down_w @ (silu64(gate_w @ x) * (up_w @ x))


# ---------------------------------------------------------------------------------------------------
# grouped_linear
# ---------------------------------------------------------------------------------------------------


def reference_grouped_linear(x64, w64, counts, g64):
    """Forward y[r] = W[e] x[r], and gradients of sum(y * g), by loops over experts and rows."""
    y = torch.zeros(x64.shape[0], w64.shape[1], dtype=torch.float64)
    gx = torch.zeros_like(x64)
    gw = torch.zeros_like(w64)
    for e, rows in segments(counts):
        for r in rows:
            y[r] = w64[e] @ x64[r]
            gx[r] = w64[e].t() @ g64[r]
            gw[e] += torch.outer(g64[r], x64[r])
    return y, gx, gw


@settings(max_examples=80, deadline=None)
@given(counts=expert_counts(), d_in=SIZES, d_out=SIZES, seed=SEEDS,
       grad_kind=st.sampled_from(["random", "sum"]))
@example(counts=[0, 0], d_in=8, d_out=8, seed=0, grad_kind="sum")  # no rows at all (an idle EP rank)
@example(counts=[2, 3], d_in=1, d_out=8, seed=0, grad_kind="random")  # in_features 1, out a multiple of 8
def test_grouped_linear_fp32_matches_per_expert_loop(counts, d_in, d_out, seed, grad_kind):
    gen = torch.Generator().manual_seed(seed)
    n_experts, rows = len(counts), sum(counts)
    x = torch.randn(rows, d_in, generator=gen).requires_grad_()
    w = torch.randn(n_experts, d_out, d_in, generator=gen).requires_grad_()
    c = torch.tensor(counts, dtype=torch.int64)
    y = grouped_linear(x, w, c)
    assert y.shape == (rows, d_out) and y.dtype == torch.float32
    # "sum" gives the stride-0 expanded gradient that reductions produce.
    g = torch.ones(rows, d_out) if grad_kind == "sum" else torch.randn(rows, d_out, generator=gen)
    (y.sum() if grad_kind == "sum" else (y * g).sum()).backward()

    ref_y, ref_gx, ref_gw = reference_grouped_linear(x.detach().double(), w.detach().double(), counts, g.double())
    tol = dict(rtol=1e-5, atol=1e-5 * (1 + math.sqrt(max(d_in, d_out, rows))))
    torch.testing.assert_close(y.detach().double(), ref_y, **tol)
    torch.testing.assert_close(x.grad.double(), ref_gx, **tol)
    torch.testing.assert_close(w.grad.double(), ref_gw, **tol)
    for e, c_e in enumerate(counts):
        if c_e == 0:
            assert not bool(w.grad[e].any()), f"expert {e} has no rows but a weight gradient"


@settings(max_examples=50, deadline=None)
@given(counts=expert_counts(allow_empty_batch=False), d_in=SIZES, d_out=SIZES, seed=SEEDS,
       mode=st.sampled_from(["bf16_tensors", "autocast"]))
def test_grouped_linear_bf16_within_bf16_tolerance(counts, d_in, d_out, seed, mode):
    gen = torch.Generator().manual_seed(seed)
    n_experts, rows = len(counts), sum(counts)
    c = torch.tensor(counts)
    g = torch.randn(rows, d_out, generator=gen)
    if mode == "bf16_tensors":
        x = torch.randn(rows, d_in, generator=gen).bfloat16().requires_grad_()
        w = torch.randn(n_experts, d_out, d_in, generator=gen).bfloat16().requires_grad_()
        y = grouped_linear(x, w, c)
    else:  # fp32 master tensors, bf16 compute
        x = torch.randn(rows, d_in, generator=gen).requires_grad_()
        w = torch.randn(n_experts, d_out, d_in, generator=gen).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = grouped_linear(x, w, c)
    assert y.dtype == torch.bfloat16
    (y.float() * g).sum().backward()
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype

    x64 = x.detach().bfloat16().double()
    w64 = w.detach().bfloat16().double()
    ref_y, ref_gx, ref_gw = reference_grouped_linear(x64, w64, counts, g.bfloat16().double())
    # bf16 has 8 significant bits; products accumulate over up to ~20 terms of size ~1.
    for got, ref, k in ((y, ref_y, d_in), (x.grad, ref_gx, d_out), (w.grad, ref_gw, max(counts))):
        torch.testing.assert_close(got.detach().double(), ref, rtol=2e-2, atol=2e-2 * math.sqrt(k))


def test_equal_groups_run_as_one_batched_gemm():
    """Groups of one size take torch.bmm in the forward, the input gradient and the weight gradient, and
    match the per-expert reference; other groups never do."""
    assert grouped.equal_group_size([4, 8, 12]) == 4
    assert grouped.equal_group_size([4, 8, 13]) is None and grouped.equal_group_size([0, 0]) is None
    gen = torch.Generator().manual_seed(0)
    for counts, batched in (([4, 4, 4], True), ([4, 0, 8], False)):
        x = torch.randn(12, 13, generator=gen).requires_grad_()
        w = torch.randn(3, 6, 13, generator=gen).requires_grad_()
        g = torch.randn(12, 6, generator=gen)
        with mock.patch.object(grouped.torch, "bmm", wraps=torch.bmm) as spy:
            (grouped_linear(x, w, torch.tensor(counts)) * g).sum().backward()
        assert spy.call_count == (3 if batched else 0)
        ref_y, ref_gx, ref_gw = reference_grouped_linear(x.detach().double(), w.detach().double(), counts, g.double())
        torch.testing.assert_close(x.grad.double(), ref_gx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.grad.double(), ref_gw, rtol=1e-5, atol=1e-5)


def test_both_grouped_paths_are_exercised():
    """The fp32 sizes drawn above reach torch's grouped_mm (multiples of 8) and the fallback (others)."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5])
    for d_in, expect_torch in ((16, True), (13, False)):
        x = torch.randn(8, d_in, generator=gen)
        w = torch.randn(3, 24, d_in, generator=gen)
        with mock.patch.object(grouped.F, "grouped_mm", wraps=F.grouped_mm) as spy:
            y = grouped_linear(x, w, counts)
        assert spy.called == expect_torch, f"d_in={d_in}: grouped_mm called={spy.called}"
        ref, _, _ = reference_grouped_linear(x.double(), w.double(), [3, 0, 5], torch.zeros(8, 24).double())
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# GroupedExperts
# ---------------------------------------------------------------------------------------------------


def reference_experts(x64, gate_up64, down64, counts, inter, probs64=None):
    """Row r: probs64[r] (1 if None) times its expert's SwiGLU MLP of x64[r], in fp64."""
    out = torch.zeros(x64.shape[0], down64.shape[1], dtype=torch.float64)
    for e, rows in segments(counts):
        for r in rows:
            y = swiglu64(x64[r], gate_up64[e, :inter], gate_up64[e, inter:], down64[e])
            out[r] = y if probs64 is None else probs64[r] * y
    return out


@settings(max_examples=60, deadline=None)
@given(counts=expert_counts(allow_empty_batch=False), hidden=SIZES, inter=SIZES, seed=SEEDS,
       multiple=st.sampled_from([1, 1, 3, 32]), equal_up_to=st.sampled_from([1.0, 1.25, 1e9]))
@example(counts=[3, 0, 5], hidden=16, inter=8, seed=0, multiple=1, equal_up_to=1.0)  # grouped_mm, an idle expert
@example(counts=[1], hidden=8, inter=1, seed=0, multiple=1, equal_up_to=1.0)  # down_proj has in_features 1
@example(counts=[3, 0, 5], hidden=16, inter=8, seed=0, multiple=32, equal_up_to=1.0)  # padded as bf16 on CPU
@example(counts=[3, 0, 5], hidden=16, inter=8, seed=0, multiple=4, equal_up_to=1e9)  # one batched GEMM
def test_grouped_experts_fp32_forward_and_gradients(counts, hidden, inter, seed, multiple, equal_up_to):
    gen = torch.Generator().manual_seed(seed)
    n_experts, rows = len(counts), sum(counts)
    backend = get_backend("fp32")
    experts = GroupedExperts(n_experts, hidden, inter, backend)
    init_(experts, gen, scale=2.0)
    x = torch.randn(rows, hidden, generator=gen).requires_grad_()
    probs = torch.rand(rows, generator=gen).requires_grad_()  # each row's gate value
    g = torch.randn(rows, hidden, generator=gen)
    with mock.patch.object(backend, "expert_row_multiple", return_value=multiple), \
            mock.patch.object(GroupedExperts, "equal_groups_up_to", equal_up_to):
        y = experts(x, torch.tensor(counts), probs)
    assert y.shape == (rows, hidden)
    (y * g).sum().backward()

    x64 = x.detach().double().requires_grad_()
    p64 = probs.detach().double().requires_grad_()
    gu64 = experts.gate_up_proj.detach().double().requires_grad_()
    d64 = experts.down_proj.detach().double().requires_grad_()
    ref = reference_experts(x64, gu64, d64, counts, inter, p64)
    (ref * g.double()).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5 * (1 + math.sqrt(max(hidden, inter, rows))))
    torch.testing.assert_close(y.detach().double(), ref.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(probs.grad.double(), p64.grad, **tol)
    torch.testing.assert_close(experts.gate_up_proj.grad.double(), gu64.grad, **tol)
    torch.testing.assert_close(experts.down_proj.grad.double(), d64.grad, **tol)


@settings(max_examples=80, deadline=None)
@given(counts=expert_counts(), multiple=st.integers(1, 40), equal_up_to=st.sampled_from([1.0, 1.25, 2.0, 1e9]))
def test_pad_groups_puts_each_group_at_the_start_of_its_padded_slot(counts, multiple, equal_up_to):
    layout = pad_groups(torch.tensor(counts), multiple, equal_up_to)
    rows, padded = layout.rows, layout.counts
    assert (padded % multiple == 0).all() and (padded >= torch.tensor(counts)).all()
    own = [-(-c // multiple) * multiple for c in counts]  # each group to its own multiple
    largest = max(own, default=0)
    if len(counts) > 1 and largest * len(counts) <= equal_up_to * sum(own) and equal_up_to > 1:
        assert padded.tolist() == [largest] * len(counts)
    else:
        assert padded.tolist() == own
    expected, slot = [], 0
    for c, p in zip(counts, padded.tolist()):
        expected += range(slot, slot + c)
        slot += p
    assert rows.tolist() == expected
    assert sorted(rows.tolist() + layout.padding.tolist()) == list(range(int(padded.sum())))
    assert layout.source[rows].tolist() == list(range(len(rows)))


@settings(max_examples=30, deadline=None)
@given(counts=expert_counts(), multiple=st.integers(1, 40), seed=SEEDS)
def test_padding_rows_equals_placing_them_into_zeros(counts, multiple, seed):
    layout = pad_groups(torch.tensor(counts), multiple)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), 5, generator=gen).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(int(layout.counts.sum()), 5, generator=gen).to(torch.bfloat16)
    out = _PadRows.apply(x, layout)
    assert torch.equal(out, x.detach().new_zeros(out.shape).index_copy_(0, layout.rows, x.detach()))
    out.backward(grad)
    assert torch.equal(x.grad, grad[layout.rows])


@settings(max_examples=30, deadline=None)
@given(counts=expert_counts(allow_empty_batch=False), multiple=st.integers(1, 40), seed=SEEDS)
def test_taking_rows_backward_equals_index_selects(counts, multiple, seed):
    """_TakeRows gathers the gradient rows back (padding rows zero); index_select's own backward adds them
    into zeros: the same, out of a padded layout and out of a permutation (the combine's expert order)."""
    layout = pad_groups(torch.tensor(counts), multiple)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(layout.rows), generator=gen)
    inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(len(order)))
    for rows, source, padding in ((layout.rows, layout.source, layout.padding), (inverse, order, order[:0])):
        y = torch.randn(len(source), 5, generator=gen).to(torch.bfloat16)
        grad = torch.randn(len(rows), 5, generator=gen).to(torch.bfloat16)
        ours, theirs = y.clone().requires_grad_(), y.clone().requires_grad_()
        out = _TakeRows.apply(ours, rows, source, padding)
        assert torch.equal(out, theirs.index_select(0, rows))
        out.backward(grad)
        theirs.index_select(0, rows).backward(grad)
        assert torch.equal(ours.grad, theirs.grad)


def test_bf16_on_cpu_pads_expert_groups_and_the_others_do_not():
    x = torch.zeros(4, 8)
    assert get_backend("fp32").expert_row_multiple(x) == 1
    for name in ("bf16", "fp8-emulated"):
        backend = get_backend(name)
        with backend.autocast():
            assert backend.expert_row_multiple(x) == (32 if name == "bf16" else 1), name


@settings(max_examples=25, deadline=None)
@given(counts=expert_counts(allow_empty_batch=False), hidden=SIZES, inter=SIZES, seed=SEEDS)
def test_grouped_experts_bf16_backend(counts, hidden, inter, seed):
    gen = torch.Generator().manual_seed(seed)
    backend = get_backend("bf16")
    experts = GroupedExperts(len(counts), hidden, inter, backend)
    init_(experts, gen, scale=2.0)
    x = torch.randn(sum(counts), hidden, generator=gen)
    with backend.autocast():
        y = experts(x, torch.tensor(counts), torch.ones(len(x)))
    assert y.dtype == torch.bfloat16
    ref = reference_experts(x.double(), experts.gate_up_proj.detach().double(), experts.down_proj.detach().double(),
                            counts, inter)
    # Two bf16 GEMMs and a bf16 activation: a few bf16 ulps relative to the output scale.
    scale = 1 + ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref, rtol=4e-2, atol=4e-2 * scale)


# ---------------------------------------------------------------------------------------------------
# LocalDispatcher
# ---------------------------------------------------------------------------------------------------


def random_routing(n_tokens: int, n_experts: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(n_tokens)])


@settings(max_examples=80, deadline=None)
@given(n_tokens=st.integers(1, 20), n_experts=st.integers(1, 9), data=st.data(), hidden=st.integers(1, 12),
       seed=SEEDS)
def test_dispatch_combine_round_trip(n_tokens, n_experts, data, hidden, seed):
    top_k = data.draw(st.integers(1, n_experts), label="top_k")
    gen = torch.Generator().manual_seed(seed)
    indices = random_routing(n_tokens, n_experts, top_k, gen)
    x = torch.randn(n_tokens, hidden, generator=gen)
    disp = LocalDispatcher()
    ones = torch.ones(n_tokens, top_k)
    routed, counts, state = disp.dispatch(x, indices, ones, n_experts)

    assert routed.shape == (n_tokens * top_k, hidden)
    assert counts.tolist() == [sum(e in row for row in indices.tolist()) for e in range(n_experts)]
    # Expert e's segment holds exactly the tokens routed to e.
    ids, _, _ = disp.dispatch(torch.arange(n_tokens, dtype=torch.float32).unsqueeze(1), indices, ones, n_experts)
    ids = ids.squeeze(1).long()
    torch.testing.assert_close(routed, x[ids], rtol=0, atol=0)
    for e, rows in segments(counts.tolist()):
        want = sorted(t for t, row in enumerate(indices.tolist()) if e in row)
        assert sorted(ids[list(rows)].tolist()) == want

    # Identity experts: every token comes back top_k times (the combine is a plain sum).
    back = disp.combine(routed, state)
    torch.testing.assert_close(back, top_k * x, rtol=1e-6, atol=1e-6)
    # Expert e multiplies by (e + 1) and by each row's gate value: sum_k w_k (idx_k + 1) x.
    w = torch.rand(n_tokens, top_k, generator=gen)
    expert_of_row = torch.repeat_interleave(torch.arange(n_experts), counts)
    state = disp.dispatch(x, indices, w, n_experts)[2]
    y = routed * (expert_of_row + 1).unsqueeze(1).float() * state.row_weights.unsqueeze(1)
    back = disp.combine(y, state)
    want = ((w * (indices + 1).float()).sum(-1, keepdim=True)) * x
    torch.testing.assert_close(back, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 8), hidden=st.integers(1, 40), seed=SEEDS,
       dtype=st.sampled_from([torch.bfloat16, torch.float32]))
def test_combine_sum_is_the_slot_order_reduction_and_copies_the_gradient_to_every_slot(n, k, hidden, seed, dtype):
    """sum_slots (the combine: the experts already scaled their rows by the gate values) is y.sum(1) accumulated
    in fp32 in slot order and rounded once; its gradient is the token's gradient in every slot."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n, k, hidden, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(n, hidden, generator=gen).to(dtype)
    summed = sum_slots(y)
    assert summed.dtype == dtype
    acc = y.detach()[:, 0].double()
    for j in range(1, k):
        acc = (acc + y.detach()[:, j].double()).float().double()
    assert torch.equal(summed, acc.to(dtype))
    ulp = 2**-8 if dtype == torch.bfloat16 else 2**-23
    torch.testing.assert_close(summed, y.sum(1), rtol=ulp, atol=ulp * k * (1 + y.abs().max().item()))
    summed.backward(g)
    assert y.grad.dtype == dtype and torch.equal(y.grad, g.unsqueeze(1).expand(n, k, hidden))


@settings(max_examples=40, deadline=None)
@given(n_tokens=st.integers(0, 20), n_experts=st.integers(1, 6), data=st.data(), hidden=st.sampled_from([8, 16]),
       inter=st.sampled_from([4, 8]), seed=SEEDS, backend_name=st.sampled_from(["fp32", "bf16"]),
       multiple=st.sampled_from([1, 2, 32]), equal_up_to=st.sampled_from([1.0, 1e9]))
def test_dispatcher_run_equals_dispatch_experts_combine(n_tokens, n_experts, data, hidden, inter, seed,
                                                        backend_name, multiple, equal_up_to):
    """LocalDispatcher.run (tokens gathered straight into the experts' padded layout and back) gives the
    bits of dispatch -> GroupedExperts -> combine, forward and every gradient, padded or not."""
    top_k = data.draw(st.integers(1, n_experts), label="top_k")
    gen = torch.Generator().manual_seed(seed)
    backend = get_backend(backend_name)
    experts = GroupedExperts(n_experts, hidden, inter, backend)
    init_(experts, gen, scale=2.0)
    indices = random_routing(n_tokens, n_experts, top_k, gen) if n_tokens else torch.zeros(0, top_k, dtype=torch.long)
    x0 = torch.randn(n_tokens, hidden, generator=gen)
    w0 = torch.rand(n_tokens, top_k, generator=gen)
    g = torch.randn(n_tokens, hidden, generator=gen)
    disp, results = LocalDispatcher(), []
    for fused in (True, False):
        experts.zero_grad(set_to_none=True)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with mock.patch.object(backend, "expert_row_multiple", return_value=multiple), \
                mock.patch.object(GroupedExperts, "equal_groups_up_to", equal_up_to), backend.autocast():
            tokens = x.to(backend.compute_dtype)  # as MoE.route hands them over
            if fused:
                out, counts = disp.run(tokens, indices, w, experts)
            else:
                rows, counts, state = disp.dispatch(tokens, indices, w, n_experts)
                out = disp.combine(experts(rows, counts, state.row_weights), state)
        (out.float() * g).sum().backward()
        results.append([out, counts, x.grad, w.grad] + [grad_or_zero(p) for p in experts.parameters()])
    for mine, plain in zip(*results):
        assert (mine is None) == (plain is None)
        if mine is not None:
            assert torch.equal(mine, plain)


# ---------------------------------------------------------------------------------------------------
# MoE layer
# ---------------------------------------------------------------------------------------------------


@st.composite
def moe_configs(draw):
    n_group = draw(st.integers(1, 3))
    group_size = draw(st.integers(1, 4))
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, topk_group * group_size))
    return ModelConfig.from_preset(
        "tiny",
        hidden_size=draw(SIZES),
        moe_intermediate_size=draw(SIZES),
        n_routed_experts=n_group * group_size,
        n_group=n_group,
        topk_group=topk_group,
        num_experts_per_tok=top_k,
        n_shared_experts=draw(st.integers(0, 2)),
        scoring_func=draw(st.sampled_from(["sigmoid", "softmax"])),
        norm_topk_prob=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        aux_loss_alpha=draw(st.sampled_from([0.0, 0.3])),
    )


def build_moe(cfg: ModelConfig, gen: torch.Generator, bias_scale: float = 1.0) -> MoE:
    moe = MoE(cfg, get_backend("fp32"))
    init_(moe, gen, scale=1.5)
    moe.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=gen) * bias_scale - 0.5)
    return moe


@settings(max_examples=15, deadline=None)
@given(n_tokens=st.integers(1, 12), n_experts=st.integers(2, 6), seed=SEEDS)
def test_split_path_equals_run_under_the_fp8_swiglu_cache(n_tokens, n_experts, seed):
    """Under V3's selective recompute with FP8 SwiGLU inputs (the gate values folded into the recomputed SwiGLU
    output): dispatch -> experts(rows, counts, row_weights) -> combine, the path the pipeline's overlapped
    schedule and expert parallelism take, gives run's bits, forward and every gradient."""
    gen = torch.Generator().manual_seed(seed)
    backend = get_backend("fp8-emulated")
    experts = GroupedExperts(n_experts, 128, 128, backend)
    init_(experts, gen, scale=2.0)
    experts.recompute_swiglu = SwiGLUCache(backend.kernels.quantize, backend.cfg.pow2_scales)
    top_k = min(2, n_experts)
    indices = random_routing(n_tokens, n_experts, top_k, gen)
    x0, w0 = torch.randn(n_tokens, 128, generator=gen), torch.rand(n_tokens, top_k, generator=gen)
    g = torch.randn(n_tokens, 128, generator=gen)
    disp, results = LocalDispatcher(), []
    for path in ("run", "split"):
        experts.zero_grad(set_to_none=True)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with backend.autocast():
            tokens = x.to(backend.compute_dtype)
            if path == "run":
                out, _ = disp.run(tokens, indices, w, experts)
            else:
                rows, counts, state = disp.dispatch(tokens, indices, w, n_experts)
                out = disp.combine(experts(rows, counts, state.row_weights), state)
        (out.float() * g).sum().backward()
        results.append([out, x.grad, w.grad] + [grad_or_zero(p) for p in experts.parameters()])
    for ran, split in zip(*results):
        assert torch.equal(ran, split)


def grad_or_zero(t: torch.Tensor) -> torch.Tensor:
    """Autograd leaves no gradient on tensors the loss never used (an expert no token chose)."""
    return t.grad if t.grad is not None else torch.zeros_like(t)


def reference_moe(cfg: ModelConfig, sd64: dict[str, torch.Tensor], x64: torch.Tensor, indices: torch.Tensor):
    """Dense reference from the HF-named state dict: per token, sum_k gate_k SwiGLU_{e_k}(x) + shared(x).

    Returns (output [N, H], scores [N, E]); everything float64 and differentiable in x64 and sd64.
    """
    logits = x64 @ sd64["gate.weight"].t()
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
    rows = []
    for t in range(x64.shape[0]):
        chosen = [int(e) for e in indices[t]]
        s = torch.stack([scores[t, e] for e in chosen])
        gates = (s / s.sum() if cfg.norm_topk_prob else s) * cfg.routed_scaling_factor
        acc = torch.zeros(x64.shape[1], dtype=torch.float64)
        for gate, e in zip(gates, chosen):
            p = f"experts.{e}."
            acc = acc + gate * swiglu64(x64[t], sd64[p + "gate_proj.weight"], sd64[p + "up_proj.weight"],
                                        sd64[p + "down_proj.weight"])
        if cfg.n_shared_experts:
            acc = acc + swiglu64(x64[t], sd64["shared_experts.gate_proj.weight"],
                                 sd64["shared_experts.up_proj.weight"], sd64["shared_experts.down_proj.weight"])
        rows.append(acc)
    return torch.stack(rows), scores


def reference_balance_loss(scores64, indices, batch, n_experts, top_k):
    seq = scores64.shape[0] // batch
    total = 0.0
    for b in range(batch):
        for i in range(n_experts):
            toks = range(b * seq, (b + 1) * seq)
            f_i = n_experts / (top_k * seq) * sum(i in indices[t].tolist() for t in toks)
            p_i = sum(scores64[t, i] / scores64[t].sum() for t in toks) / seq
            total = total + f_i * p_i
    return total / batch


@settings(max_examples=30, deadline=None)
@given(cfg=moe_configs(), batch=st.integers(1, 3), seq=st.integers(1, 5), seed=SEEDS,
       aux_scale=st.sampled_from([1.0, 0.25]))
def test_moe_matches_dense_reference_forward_and_backward(cfg, batch, seq, seed, aux_scale):
    gen = torch.Generator().manual_seed(seed)
    moe = build_moe(cfg, gen)
    hidden, n_experts, top_k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    x = torch.randn(batch, seq, hidden, generator=gen)
    flat = x.reshape(-1, hidden)
    with torch.no_grad():
        indices, _, _ = moe.gate(flat)
    size = n_experts // cfg.n_group
    for row in indices.tolist():
        assert len(set(row)) == top_k and len({e // size for e in row}) <= cfg.topk_group

    sd64 = {k: v.detach().double().requires_grad_() for k, v in moe.state_dict().items()}
    x64 = flat.detach().double().requires_grad_()
    ref_out, ref_scores = reference_moe(cfg, sd64, x64, indices)
    tol = dict(rtol=1e-5, atol=2e-5 * (1 + math.sqrt(max(hidden, cfg.moe_intermediate_size))))

    moe.eval()
    with torch.no_grad():
        out_eval = moe(x)
    assert out_eval.shape == x.shape
    torch.testing.assert_close(out_eval.reshape(-1, hidden).double(), ref_out.detach(), **tol)

    # Training: same output, load counted, balance loss reported and its gradient added (scaled).
    moe.train()
    moe.aux_loss_scale = aux_scale
    xt = x.clone().requires_grad_()
    out = moe(xt)
    torch.testing.assert_close(out.detach(), out_eval, rtol=0, atol=0)
    assert moe.load_counts.tolist() == torch.bincount(indices.reshape(-1), minlength=n_experts).float().tolist()
    g = torch.randn(out.shape, generator=gen)
    (out * g).sum().backward()

    ref_total = (ref_out * g.reshape(-1, hidden).double()).sum()
    if cfg.aux_loss_alpha > 0:
        aux = cfg.aux_loss_alpha * reference_balance_loss(ref_scores, indices, batch, n_experts, top_k)
        assert moe.last_aux_loss.item() == pytest.approx(aux.item(), rel=1e-5, abs=1e-8)
        ref_total = ref_total + aux_scale * aux
    ref_total.backward()
    with torch.no_grad():  # a second micro-batch of the same global batch adds to the load
        moe(x)
    assert moe.load_counts.tolist() == (2 * torch.bincount(indices.reshape(-1), minlength=n_experts)).float().tolist()
    torch.testing.assert_close(xt.grad.reshape(-1, hidden).double(), x64.grad, **tol)
    torch.testing.assert_close(moe.gate.weight.grad.double(), sd64["gate.weight"].grad, **tol)
    inter = cfg.moe_intermediate_size
    for e in range(n_experts):
        p = f"experts.{e}."
        grads = {"gate_proj": moe.experts.gate_up_proj.grad[e, :inter],
                 "up_proj": moe.experts.gate_up_proj.grad[e, inter:], "down_proj": moe.experts.down_proj.grad[e]}
        for name, got in grads.items():
            torch.testing.assert_close(got.double(), grad_or_zero(sd64[p + name + ".weight"]), **tol)
    if cfg.n_shared_experts:
        for name in EXPERT_WEIGHTS:
            torch.testing.assert_close(getattr(moe.shared_experts, name).weight.grad.double(),
                                       sd64[f"shared_experts.{name}.weight"].grad, **tol)


@settings(max_examples=25, deadline=None)
@given(cfg=moe_configs(), seed=SEEDS, data=st.data())
def test_moe_state_dict_per_expert_keys_round_trip(cfg, seed, data):
    gen = torch.Generator().manual_seed(seed)
    moe = build_moe(cfg, gen).eval()
    n_experts, hidden, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    sd = moe.state_dict()

    expected = {"gate.weight", "gate.e_score_correction_bias"}
    expected |= {f"experts.{e}.{n}.weight" for e in range(n_experts) for n in EXPERT_WEIGHTS}
    if cfg.n_shared_experts:
        expected |= {f"shared_experts.{n}.weight" for n in EXPERT_WEIGHTS}
    assert set(sd) == expected
    for e in range(n_experts):
        assert sd[f"experts.{e}.gate_proj.weight"].shape == (inter, hidden)
        assert sd[f"experts.{e}.up_proj.weight"].shape == (inter, hidden)
        assert sd[f"experts.{e}.down_proj.weight"].shape == (hidden, inter)
        assert torch.equal(sd[f"experts.{e}.gate_proj.weight"], moe.experts.gate_up_proj[e, :inter])
        assert torch.equal(sd[f"experts.{e}.up_proj.weight"], moe.experts.gate_up_proj[e, inter:])
        assert torch.equal(sd[f"experts.{e}.down_proj.weight"], moe.experts.down_proj[e])

    # Load into a differently initialised layer: identical outputs.
    x = torch.randn(2, 3, hidden, generator=gen)
    with torch.no_grad():
        want = moe(x)
    saved = {k: v.clone() for k, v in sd.items()}
    other = build_moe(cfg, torch.Generator().manual_seed(seed + 1)).eval()
    result = other.load_state_dict(saved, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(other(x), want)
    assert torch.equal(other.gate.e_score_correction_bias, moe.gate.e_score_correction_bias)

    # A missing expert tensor is reported (strict: an error naming it; non-strict: in missing_keys).
    e = data.draw(st.integers(0, n_experts - 1), label="expert")
    name = data.draw(st.sampled_from(EXPERT_WEIGHTS), label="weight")
    key = f"experts.{e}.{name}.weight"
    partial = {k: v for k, v in saved.items() if k != key}
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        build_moe(cfg, gen).load_state_dict(partial, strict=True)
    assert build_moe(cfg, gen).load_state_dict(partial, strict=False).missing_keys == [key]

    # An expert that the layer does not have is unexpected; a wrong shape is an error.
    extra = {**saved, f"experts.{n_experts}.up_proj.weight": torch.zeros(inter, hidden)}
    with pytest.raises(RuntimeError, match=rf"experts\.{n_experts}\.up_proj\.weight"):
        build_moe(cfg, gen).load_state_dict(extra, strict=True)
    assert build_moe(cfg, gen).load_state_dict(extra, strict=False).unexpected_keys == [
        f"experts.{n_experts}.up_proj.weight"]
    bad = {**saved, key: torch.zeros(saved[key].shape[0] + 1, saved[key].shape[1])}
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        build_moe(cfg, gen).load_state_dict(bad, strict=True)
