"""Node-limited routing (REFERENCE §2; DeepSeek-V3: each token reaches at most M nodes).

A node is ``experts_per_node`` consecutive experts (ranks_per_node consecutive EP ranks in
moelib.parallel.expert_parallel). Properties: no token's experts span more than M nodes; with M >= the
node count the routing is unchanged; without a group limit the choice is the top-k of the experts on the
M best nodes by brute force (nodes scored by the sum of their ceil(k/M) best biased scores); combined with
a group limit whose groups nest in nodes, both limits hold. Scores come from seeded torch generators, so
exact ties (where top-k's order is unspecified) do not occur; near-ties are only checked for validity.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.config import ModelConfig
from moelib.errors import ConfigError
from moelib.model.moe import MoE
from moelib.model.router import Router, group_limited_topk, node_limited_scores
from moelib.parallel.expert_parallel import check_node_limit
from moelib.precision.backends import get_backend

SEEDS = st.integers(0, 2**31 - 1)
OFFSETS = st.sampled_from([0.0, -1.0, -30.0, 3.0])  # negative: every biased score below zero


@st.composite
def layouts(draw):
    """(n_nodes, experts_per_node, group_size, topk_group, top_k, max_nodes) with groups nested in
    nodes and at least top_k experts left by either limit."""
    n_nodes = draw(st.integers(1, 6))
    per_node = draw(st.integers(1, 6))
    group_size = draw(st.sampled_from([d for d in range(1, per_node + 1) if per_node % d == 0]))
    n_group = n_nodes * per_node // group_size
    topk_group = draw(st.integers(1, n_group))
    max_nodes = draw(st.integers(1, n_nodes + 1))
    cap = min(topk_group * group_size, max_nodes * per_node)
    top_k = draw(st.integers(1, cap))
    return n_nodes, per_node, group_size, topk_group, top_k, max_nodes


def route(biased, top_k, per_node, max_nodes, n_group=1, topk_group=1):
    return group_limited_topk(node_limited_scores(biased, top_k, per_node, max_nodes), top_k, n_group, topk_group)


def random_scores(seed: int, n_tokens: int, n_experts: int, offset: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_tokens, n_experts, generator=gen) + torch.randn(n_experts, generator=gen) * 0.3 + offset


@settings(max_examples=200, deadline=None)
@given(layout=layouts(), n_tokens=st.integers(1, 20), seed=SEEDS, offset=OFFSETS, grouped=st.booleans())
def test_no_token_spans_more_than_max_nodes(layout, n_tokens, seed, offset, grouped):
    n_nodes, per_node, group_size, topk_group, top_k, max_nodes = layout
    n_experts = n_nodes * per_node
    n_group = n_experts // group_size if grouped else 1
    topk_group = topk_group if grouped else 1
    biased = random_scores(seed, n_tokens, n_experts, offset)
    indices = route(biased, top_k, per_node, max_nodes, n_group, topk_group)
    assert indices.shape == (n_tokens, top_k)
    for t, row in enumerate(indices.tolist()):
        assert len(set(row)) == top_k, (t, row)
        assert len({e // per_node for e in row}) <= max_nodes, (t, row)
        if grouped:
            assert len({e // group_size for e in row}) <= topk_group, (t, row)


@settings(max_examples=100, deadline=None)
@given(layout=layouts(), n_tokens=st.integers(1, 20), seed=SEEDS, offset=OFFSETS, extra=st.integers(0, 3))
def test_enough_nodes_leave_routing_unchanged(layout, n_tokens, seed, offset, extra):
    n_nodes, per_node, group_size, topk_group, top_k, _ = layout
    n_experts = n_nodes * per_node
    n_group = n_experts // group_size
    biased = random_scores(seed, n_tokens, n_experts, offset)
    limited = route(biased, top_k, per_node, n_nodes + extra, n_group, topk_group)
    assert torch.equal(limited, group_limited_topk(biased, top_k, n_group, topk_group))


def brute_force(row: list[float], top_k: int, per_node: int, max_nodes: int) -> tuple[set[int], bool]:
    """(chosen experts, near-tie at a decision boundary) for one token, by sorting Python floats."""
    n_nodes = len(row) // per_node
    take = min(per_node, -(-top_k // max_nodes))
    score = [sum(sorted(row[n * per_node:(n + 1) * per_node], reverse=True)[:take]) for n in range(n_nodes)]
    order = sorted(range(n_nodes), key=lambda n: -score[n])
    kept = set(order[:max_nodes])
    tie = max_nodes < n_nodes and abs(score[order[max_nodes - 1]] - score[order[max_nodes]]) < 1e-5
    ranked = sorted((e for e in range(len(row)) if e // per_node in kept), key=lambda e: -row[e])
    if len(ranked) > top_k:
        tie |= abs(row[ranked[top_k - 1]] - row[ranked[top_k]]) < 1e-5
    return set(ranked[:top_k]), tie


@settings(max_examples=150, deadline=None)
@given(layout=layouts(), n_tokens=st.integers(1, 20), seed=SEEDS, offset=OFFSETS)
def test_selection_is_top_k_of_the_best_nodes(layout, n_tokens, seed, offset):
    n_nodes, per_node, _, _, top_k, max_nodes = layout
    biased = random_scores(seed, n_tokens, n_nodes * per_node, offset)
    indices = route(biased, top_k, per_node, max_nodes)
    for row, chosen in zip(biased.tolist(), indices.tolist()):
        want, tie = brute_force(row, top_k, per_node, max_nodes)
        if not tie:
            assert set(chosen) == want


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    return ModelConfig.from_preset("tiny", **{**base, **overrides})


@pytest.mark.parametrize("seed", range(5))
def test_router_gate_values_use_unbiased_scores_of_node_limited_choice(seed):
    """Router.node_limit: selection on biased scores within M nodes; gate values from the unbiased ones."""
    gen = torch.Generator().manual_seed(seed)
    router = Router(tiny_cfg(n_group=1, topk_group=1))
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
        router.e_score_correction_bias.copy_(torch.randn(16, generator=gen))
    x = torch.randn(64, 32, generator=gen)
    free, _, _ = copy.deepcopy(router)(x)
    router.node_limit = (8, 1)  # 2 nodes of 8 experts, one node per token
    indices, weights, scores = router(x)
    assert all(len({e // 8 for e in row}) == 1 for row in indices.tolist())
    assert any(len({e // 8 for e in row}) == 2 for row in free.tolist())  # the limit binds
    gate = scores.gather(1, indices)
    torch.testing.assert_close(weights, gate / gate.sum(-1, keepdim=True) * router.routed_scaling_factor)


def moe(**overrides) -> MoE:
    return MoE(tiny_cfg(**overrides), get_backend("fp32"))


def test_check_node_limit_returns_experts_per_node():
    assert check_node_limit(moe(), ep_size=4, ranks_per_node=2, max_nodes=1) == (8, 1)


@pytest.mark.parametrize("ep_size, ranks_per_node, max_nodes, overrides, rule", [
    (4, 3, 1, {}, "must be a positive divisor of the expert-parallel size"),
    (4, 2, 0, {}, "max_nodes must be at least 1"),
    (16, 1, 3, {}, "must be at least num_experts_per_tok"),
    (16, 2, 2, {}, "must nest in nodes"),  # groups of 4 experts, nodes of 2
])
def test_check_node_limit_names_the_rule(ep_size, ranks_per_node, max_nodes, overrides, rule):
    with pytest.raises(ConfigError, match=rule):
        check_node_limit(moe(**overrides), ep_size, ranks_per_node, max_nodes)
