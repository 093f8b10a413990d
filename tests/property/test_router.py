"""Property tests of the DeepSeekMoE router (REFERENCE.md section 2).

Random tensors come from seeded torch generators (hypothesis draws the seeds, shapes and scales) so
that hypothesis' favourite degenerate inputs (all zeros) do not produce exact ties, whose order top-k
leaves unspecified. Where the reference selection has a near-tie at a decision boundary the token is
only checked for validity, never for the exact set.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.config import ModelConfig
from moelib.model.router import Router, group_limited_topk, max_violation, sequence_balance_loss

SEEDS = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------------------------------------------
# Strategies and references
# ---------------------------------------------------------------------------------------------------


@st.composite
def routing_shapes(draw):
    """(n_experts, n_group, topk_group, top_k) obeying the config rules."""
    n_group = draw(st.integers(1, 4))
    group_size = draw(st.integers(1, 5))
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, topk_group * group_size))
    return n_group * group_size, n_group, topk_group, top_k


@st.composite
def router_configs(draw):
    n_experts, n_group, topk_group, top_k = draw(routing_shapes())
    return ModelConfig.from_preset(
        "tiny",
        hidden_size=draw(st.integers(1, 40)),
        n_routed_experts=n_experts,
        n_group=n_group,
        topk_group=topk_group,
        num_experts_per_tok=top_k,
        scoring_func=draw(st.sampled_from(["sigmoid", "softmax"])),
        norm_topk_prob=draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5, 0.37, 16.0])),
    )


# Bias draws: scale of the random part and a common offset. Negative offsets make every biased score
# negative; large scales make the bias dominate the scores.
BIAS_SCALES = st.sampled_from([0.0, 1e-3, 0.1, 1.0, 10.0, 100.0])
BIAS_OFFSETS = st.sampled_from([0.0, -1.0, -30.0, 3.0])


def make_router(cfg: ModelConfig, gen: torch.Generator, logit_scale: float = 1.0) -> Router:
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * logit_scale
                            / math.sqrt(cfg.hidden_size))
    return router


def random_bias(n: int, gen: torch.Generator, scale: float, offset: float) -> torch.Tensor:
    return (torch.randn(n, generator=gen) * scale + offset).float()


def reference_scores(router: Router, x: torch.Tensor) -> torch.Tensor:
    logits = x.double() @ router.weight.double().t()
    return logits.sigmoid() if router.scoring_func == "sigmoid" else logits.softmax(-1)


def _tie(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * (1.0 + abs(a) + abs(b))


def reference_select(row: list[float], top_k: int, n_group: int, topk_group: int, rel: float = 1e-5,
                     mask_value: float | None = None, per_group: int = 2) -> tuple[set[int], bool, set[int]]:
    """Brute-force group-limited top-k for one token.

    Returns (chosen experts, ambiguous, kept groups). ``ambiguous`` is True when a decision boundary
    (kth vs (k+1)th group or expert) is a near-tie, so that fp32 rounding may legitimately decide it
    either way. ``mask_value`` replaces -inf masking by a finite value (to show the difference).
    A group scores the sum of its ``per_group`` best (2 in V3, 1 in V2's group_limited_greedy).
    """
    n_experts = len(row)
    size = n_experts // n_group
    ambiguous = False
    kept = set(range(n_group))
    if n_group > 1 and topk_group < n_group:
        group_scores = [sum(sorted(row[g * size:(g + 1) * size], reverse=True)[:per_group]) for g in range(n_group)]
        order = sorted(range(n_group), key=lambda g: -group_scores[g])
        kept = set(order[:topk_group])
        ambiguous |= _tie(group_scores[order[topk_group - 1]], group_scores[order[topk_group]], rel)
    if mask_value is None:
        candidates = [e for e in range(n_experts) if e // size in kept]
        values = {e: row[e] for e in candidates}
    else:
        candidates = list(range(n_experts))
        values = {e: (row[e] if e // size in kept else mask_value) for e in candidates}
    ranked = sorted(candidates, key=lambda e: -values[e])
    chosen = set(ranked[:top_k])
    if len(ranked) > top_k:
        ambiguous |= _tie(values[ranked[top_k - 1]], values[ranked[top_k]], rel)
    return chosen, ambiguous, kept


def check_structure(indices: torch.Tensor, n_tokens: int, n_experts: int, n_group: int, topk_group: int,
                    top_k: int) -> None:
    assert indices.shape == (n_tokens, top_k)
    assert indices.dtype == torch.int64
    assert int(indices.min()) >= 0 and int(indices.max()) < n_experts
    size = n_experts // n_group
    for t, row in enumerate(indices.tolist()):
        assert len(set(row)) == top_k, f"token {t}: repeated expert in {row}"
        groups = {e // size for e in row}
        assert len(groups) <= topk_group, f"token {t}: experts {row} span groups {groups} > {topk_group}"


# ---------------------------------------------------------------------------------------------------
# group_limited_topk against the brute-force reference
# ---------------------------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(shape=routing_shapes(), n_tokens=st.integers(1, 24), seed=SEEDS, scale=BIAS_SCALES, offset=BIAS_OFFSETS)
def test_group_limited_topk_matches_brute_force(shape, n_tokens, seed, scale, offset):
    n_experts, n_group, topk_group, top_k = shape
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_tokens, n_experts, generator=gen)
    biased = scores + random_bias(n_experts, gen, scale, offset)
    indices = group_limited_topk(biased.clone(), top_k, n_group, topk_group)
    check_structure(indices, n_tokens, n_experts, n_group, topk_group, top_k)
    decided = 0
    for t, row in enumerate(biased.tolist()):
        chosen, ambiguous, kept = reference_select(row, top_k, n_group, topk_group)
        got = set(indices[t].tolist())
        if ambiguous:
            continue
        decided += 1
        assert got == chosen, f"token {t}: biased {row} -> {sorted(got)}, reference {sorted(chosen)} (groups {kept})"
    assert decided > 0 or n_tokens < 4


@settings(max_examples=60, deadline=None)
@given(shape=routing_shapes(), n_tokens=st.integers(1, 16), seed=SEEDS,
       offset=st.sampled_from([-0.5, -3.0, -50.0]))
def test_negative_biased_scores_use_minus_inf_masking(shape, n_tokens, seed, offset):
    """All biased scores negative: the dropped groups must lose to every kept expert."""
    n_experts, n_group, topk_group, top_k = shape
    gen = torch.Generator().manual_seed(seed)
    biased = -torch.rand(n_tokens, n_experts, generator=gen) * 2 + offset
    assert bool((biased < 0).all())
    indices = group_limited_topk(biased, top_k, n_group, topk_group)
    check_structure(indices, n_tokens, n_experts, n_group, topk_group, top_k)
    for t, row in enumerate(biased.tolist()):
        chosen, ambiguous, kept = reference_select(row, top_k, n_group, topk_group)
        size = n_experts // n_group
        assert all(e // size in kept for e in indices[t].tolist()) or ambiguous
        if not ambiguous:
            assert set(indices[t].tolist()) == chosen


def test_negative_biased_scores_example_differs_from_zero_masking():
    # Groups {0,1} (score -2.1) and {2,3} (score -11): keep group 0; top-2 must be experts 0 and 1.
    # Masking the dropped group with 0 instead of -inf would pick experts 2 and 3.
    biased = torch.tensor([[-1.0, -1.1, -5.0, -6.0]])
    zero_masked, _, _ = reference_select(biased[0].tolist(), 2, 2, 1, mask_value=0.0)
    assert zero_masked == {2, 3}
    assert set(group_limited_topk(biased, 2, 2, 1)[0].tolist()) == {0, 1}


@settings(max_examples=60, deadline=None)
@given(shape=routing_shapes(), n_tokens=st.integers(1, 16), seed=SEEDS,
       method=st.sampled_from(["greedy", "group_limited_greedy"]))
def test_v2_topk_methods_match_brute_force(shape, n_tokens, seed, method):
    """DeepSeek-V2: greedy is plain top-k over every expert; group_limited_greedy ranks groups by their best
    softmax score (not V3's best two)."""
    n_experts, n_group, topk_group, top_k = shape
    cfg = ModelConfig.from_preset("tiny", hidden_size=16, n_routed_experts=n_experts, n_group=n_group,
                                  topk_group=topk_group, num_experts_per_tok=top_k, topk_method=method,
                                  scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0)
    gen = torch.Generator().manual_seed(seed)
    router = make_router(cfg, gen, logit_scale=4.0)
    x = torch.randn(n_tokens, cfg.hidden_size, generator=gen)
    indices, weights, scores = router(x)
    groups = (n_group, topk_group) if method == "group_limited_greedy" else (1, 1)
    for t, row in enumerate(scores.tolist()):
        chosen, ambiguous, _ = reference_select(row, top_k, *groups, per_group=1)
        if not ambiguous:
            assert set(indices[t].tolist()) == chosen, f"token {t}: {row}"
    assert torch.equal(weights, scores.gather(1, indices))  # V2 gates: the plain softmax scores


# ---------------------------------------------------------------------------------------------------
# Router: structure, selection, gates
# ---------------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(cfg=router_configs(), n_tokens=st.integers(1, 24), seed=SEEDS, scale=BIAS_SCALES, offset=BIAS_OFFSETS,
       logit_scale=st.sampled_from([0.1, 1.0, 4.0]), bf16_input=st.booleans())
def test_router_selection_and_gates(cfg, n_tokens, seed, scale, offset, logit_scale, bf16_input):
    gen = torch.Generator().manual_seed(seed)
    router = make_router(cfg, gen, logit_scale)
    bias = random_bias(cfg.n_routed_experts, gen, scale, offset)
    router.e_score_correction_bias.copy_(bias)
    x = torch.randn(n_tokens, cfg.hidden_size, generator=gen)
    if bf16_input:
        x = x.bfloat16()

    indices, weights, scores = router(x)
    k, n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
    check_structure(indices, n_tokens, n_experts, cfg.n_group, cfg.topk_group, k)
    assert weights.dtype == torch.float32 and scores.dtype == torch.float32
    assert weights.shape == (n_tokens, k) and scores.shape == (n_tokens, n_experts)

    # Scores are the fp32 unbiased sigmoid/softmax of x W^T.
    ref = reference_scores(router, x)
    torch.testing.assert_close(scores.double(), ref, rtol=1e-5, atol=1e-6)

    # Gates: unbiased scores of the chosen experts, normalised (if asked), times the scaling factor.
    # The normalisation's 1e-20 guard (as in HF) only matters when the chosen scores themselves are
    # that small (a large bias picking experts whose softmax score underflows): such tokens are only
    # checked for bounds.
    chosen = ref.gather(1, indices)
    expected = chosen / chosen.sum(-1, keepdim=True) if cfg.norm_topk_prob else chosen
    expected = expected * cfg.routed_scaling_factor
    normal = chosen.sum(-1) > 1e-12
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.double()[normal], expected[normal], rtol=1e-5, atol=1e-6)
    if cfg.norm_topk_prob:
        sums = weights.double().sum(-1)
        assert bool((sums <= cfg.routed_scaling_factor * (1 + 1e-5)).all())
        torch.testing.assert_close(sums[normal], torch.full_like(sums[normal], cfg.routed_scaling_factor),
                                   rtol=1e-5, atol=0)
    assert int(normal.sum()) > 0 or n_tokens < 4

    # Selection: brute force on the (float64) biased scores, wherever no near-tie makes it ambiguous.
    biased = (ref + bias.double()).tolist()
    for t, row in enumerate(biased):
        want, ambiguous, _ = reference_select(row, k, cfg.n_group, cfg.topk_group, rel=1e-4)
        if not ambiguous:
            assert set(indices[t].tolist()) == want, f"token {t}: {indices[t].tolist()} vs {sorted(want)}"

    # The gradient reaches the gate weight through the unbiased scores only; the bias is a buffer.
    assert "e_score_correction_bias" in dict(router.named_buffers())
    assert "e_score_correction_bias" not in dict(router.named_parameters())
    g = torch.randn(weights.shape, generator=gen) * normal.unsqueeze(-1)  # skip the guard-dominated tokens
    (weights * g).sum().backward()
    w64 = router.weight.detach().double().requires_grad_()
    logits = x.double() @ w64.t()
    s64 = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
    c64 = s64.gather(1, indices)
    gate64 = (c64 / c64.sum(-1, keepdim=True) if cfg.norm_topk_prob else c64) * cfg.routed_scaling_factor
    (gate64 * g.double()).sum().backward()
    # (top_k = 1 with normalisation makes the gate constant: its fp32 gradient is rounding noise.)
    atol = 1e-5 * cfg.routed_scaling_factor * math.sqrt(n_tokens)
    torch.testing.assert_close(router.weight.grad.double(), w64.grad, rtol=1e-4, atol=atol)


@settings(max_examples=60, deadline=None)
@given(cfg=router_configs(), n_tokens=st.integers(1, 24), seed=SEEDS, scales=st.tuples(BIAS_SCALES, BIAS_SCALES),
       offsets=st.tuples(BIAS_OFFSETS, BIAS_OFFSETS))
def test_bias_changes_choice_never_gate_values(cfg, n_tokens, seed, scales, offsets):
    gen = torch.Generator().manual_seed(seed)
    router = make_router(cfg, gen)
    x = torch.randn(n_tokens, cfg.hidden_size, generator=gen)
    results = []
    for scale, offset in zip(scales, offsets):
        router.e_score_correction_bias.copy_(random_bias(cfg.n_routed_experts, gen, scale, offset))
        with torch.no_grad():
            results.append(router(x))
    (i1, w1, s1), (i2, w2, s2) = results
    # Scores do not depend on the bias at all.
    assert torch.equal(s1, s2)
    # Gate values are the same function of (scores, chosen set) whatever the bias.
    for idx, w in ((i1, w1), (i2, w2)):
        chosen = s1.double().gather(1, idx)
        expect = chosen / chosen.sum(-1, keepdim=True) if cfg.norm_topk_prob else chosen
        torch.testing.assert_close(w.double(), expect * cfg.routed_scaling_factor, rtol=1e-6, atol=1e-7)
    # Where both biases choose the same set, each expert gets the same gate.
    for t in range(n_tokens):
        a = dict(zip(i1[t].tolist(), w1[t].tolist()))
        b = dict(zip(i2[t].tolist(), w2[t].tolist()))
        if set(a) == set(b):
            for e in a:
                assert a[e] == pytest.approx(b[e], rel=1e-6, abs=1e-7)


@settings(max_examples=60, deadline=None)
@given(cfg=router_configs(), n_tokens=st.integers(1, 24), seed=SEEDS, data=st.data(),
       push=st.sampled_from([5.0, 100.0, 1000.0]))
def test_large_positive_bias_forces_expert_but_not_its_gate(cfg, n_tokens, seed, data, push):
    gen = torch.Generator().manual_seed(seed)
    router = make_router(cfg, gen)
    x = torch.randn(n_tokens, cfg.hidden_size, generator=gen)
    j = data.draw(st.integers(0, cfg.n_routed_experts - 1), label="forced expert")
    bias = random_bias(cfg.n_routed_experts, gen, 0.1, 0.0)
    bias[j] += push  # scores lie in [0, 1]: 5 already beats any group of two unbiased-ish experts
    router.e_score_correction_bias.copy_(bias)
    with torch.no_grad():
        indices, weights, scores = router(x)
    ref = reference_scores(router, x)
    hit = indices == j
    assert bool((hit.sum(-1) == 1).all()), f"expert {j} with bias {push} not chosen for every token"
    gate_j = weights[hit].double()
    chosen = ref.gather(1, indices)
    share = ref[:, j] / chosen.sum(-1) if cfg.norm_topk_prob else ref[:, j]
    torch.testing.assert_close(gate_j, share * cfg.routed_scaling_factor, rtol=1e-5, atol=1e-6)
    if cfg.norm_topk_prob:
        # A share of a sum of positive scores: never the whole factor unless it is the only choice.
        assert bool((gate_j <= cfg.routed_scaling_factor * (1 + 1e-6)).all())


# ---------------------------------------------------------------------------------------------------
# Bias update, MaxVio, sequence-wise balance loss
# ---------------------------------------------------------------------------------------------------


@st.composite
def expert_counts(draw):
    n = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["random", "balanced", "symmetric"]))
    if kind == "random":
        counts = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n))
    elif kind == "balanced":
        counts = [draw(st.integers(0, 10_000))] * n
    else:  # pairs around an integer mean, plus experts exactly at the mean
        m = draw(st.integers(0, 5_000))
        counts = []
        while len(counts) < n:
            d = draw(st.integers(0, m))
            counts += [m - d, m + d] if len(counts) + 2 <= n else [m]
        counts = draw(st.permutations(counts))
    return list(counts)


@settings(max_examples=150, deadline=None)
@given(counts=expert_counts(), seed=SEEDS, speed=st.sampled_from([0.0, 1e-3, 0.01, 0.5, 3.0]),
       as_float=st.booleans())
def test_update_bias_is_sign_of_mean_minus_count(counts, seed, speed, as_float):
    n = len(counts)
    cfg = ModelConfig.from_preset("tiny", hidden_size=8, n_routed_experts=n, n_group=1, topk_group=1,
                                  num_experts_per_tok=1)
    router = Router(cfg)
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(n, generator=gen)
    router.e_score_correction_bias.copy_(start)
    c = torch.tensor(counts, dtype=torch.float32 if as_float else torch.int64)
    router.update_bias(c, speed)
    # sign(mean - c_i) = sign(sum - n * c_i), exactly, in integers.
    total = sum(counts)
    signs = [(total > n * ci) - (total < n * ci) for ci in counts]
    step = torch.tensor([s * speed for s in signs], dtype=torch.float32)
    expected = start + step
    got = router.e_score_correction_bias
    assert got.dtype == torch.float32
    assert torch.equal(got, expected), f"counts {counts}: {got.tolist()} vs {expected.tolist()}"
    for i, s in enumerate(signs):
        if s == 0:
            assert got[i].item() == start[i].item()  # count at the mean: untouched
        elif speed > 0:
            assert (got[i].item() > start[i].item()) == (s > 0)  # under-loaded up, over-loaded down


@settings(max_examples=150, deadline=None)
@given(counts=st.lists(st.integers(0, 100_000), min_size=1, max_size=20), as_float=st.booleans())
def test_max_violation_formula(counts, as_float):
    c = torch.tensor(counts, dtype=torch.float32 if as_float else torch.int64)
    got = max_violation(c)
    assert isinstance(got, float)
    mean = Fraction(sum(counts), len(counts))
    if mean == 0:
        assert got == 0.0
        return
    want = float((max(counts) - mean) / mean)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert got >= 0.0


@settings(max_examples=80, deadline=None)
@given(batch=st.integers(1, 4), seq=st.integers(1, 9), shape=routing_shapes(), seed=SEEDS,
       scoring=st.sampled_from(["sigmoid", "softmax"]))
def test_sequence_balance_loss_matches_per_sequence_reference(batch, seq, shape, seed, scoring):
    n_experts, _, _, top_k = shape
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch * seq, n_experts, generator=gen) * 2
    scores = (logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)).requires_grad_()
    indices = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(batch * seq)])

    loss = sequence_balance_loss(scores, indices, batch, top_k)
    assert loss.dim() == 0

    # Straightforward reference: loops over sequences, experts and tokens, float64.
    s64 = scores.detach().double().requires_grad_()
    total = 0.0
    for b in range(batch):
        rows = range(b * seq, (b + 1) * seq)
        per_seq = 0.0
        for i in range(n_experts):
            count = sum(int(i in indices[t].tolist()) for t in rows)
            f_i = n_experts / (top_k * seq) * count
            p_i = sum(s64[t, i] / s64[t].sum() for t in rows) / seq
            per_seq = per_seq + f_i * p_i
        total = total + per_seq
    ref = total / batch
    assert loss.detach().item() == pytest.approx(ref.detach().item(), rel=1e-5, abs=1e-7)

    # Gradient flows through P only (f is a count).
    g = torch.rand((), generator=gen).item() + 0.5
    (loss * g).backward()
    (ref * g).backward()
    torch.testing.assert_close(scores.grad.double(), s64.grad, rtol=1e-4, atol=1e-5 * (1 + s64.grad.abs().max().item()))


def test_sequence_balance_loss_uniform_routing_is_one():
    """Perfectly balanced routing and uniform scores give sum_i f_i P_i = N_r * (1/N_r) = 1."""
    n_experts, top_k, seq = 8, 2, 4  # each expert exactly once per sequence
    indices = torch.arange(seq * top_k).view(seq, top_k) % n_experts
    scores = torch.full((seq, n_experts), 0.3)
    assert sequence_balance_loss(scores, indices, 1, top_k).item() == pytest.approx(1.0, rel=1e-6)
