"""The MoE at decode: with few tokens and no autograd, only the experts the tokens chose are computed, on
unpadded rows, and the result is the grouped path's (training's dispatch -> experts -> combine)."""

from __future__ import annotations

import math
from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.inference.fp8_weights import quantize_weights
from moelib.model.dispatch import LocalDispatcher, few_rows
from moelib.model.moe import GroupedExperts
from moelib.precision import grouped
from moelib.precision.backends import get_backend


def experts_for(backend_name: str, n_experts: int, hidden: int, inter: int, gen: torch.Generator) -> GroupedExperts:
    experts = GroupedExperts(n_experts, hidden, inter, get_backend("bf16" if backend_name == "fp8-weights"
                                                                   else backend_name))
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    if backend_name == "fp8-weights":  # inference's FP8-resident weights (moelib.inference.fp8_weights)
        quantize_weights(experts)
    return experts


def routing(n_tokens: int, n_experts: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(n_tokens)])


@settings(max_examples=60, deadline=None)
@given(n_experts=st.integers(2, 32), data=st.data(), hidden=st.sampled_from([8, 16, 13]),
       inter=st.sampled_from([8, 5]), seed=st.integers(0, 2**31 - 1),
       backend_name=st.sampled_from(["fp32", "bf16", "fp8-emulated", "fp8-weights"]))
def test_decode_moe_equals_the_grouped_path(n_experts, data, hidden, inter, seed, backend_name):
    top_k = data.draw(st.integers(1, n_experts), label="top_k")
    n_tokens = data.draw(st.integers(1, max(1, n_experts // top_k)), label="n_tokens")
    gen = torch.Generator().manual_seed(seed)
    experts = experts_for(backend_name, n_experts, hidden, inter, gen)
    backend = experts.backend
    indices = routing(n_tokens, n_experts, top_k, gen)
    weights = torch.rand(n_tokens, top_k, generator=gen)
    x = torch.randn(n_tokens, hidden, generator=gen)
    disp = LocalDispatcher()
    with backend.autocast():
        tokens = x.to(backend.compute_dtype)
        with torch.no_grad():
            assert few_rows(indices, n_experts)
            ours, counts = disp.run(tokens, indices, weights, experts)
        with torch.enable_grad():  # the training path: rows padded where the backend asks, every group run
            assert not few_rows(indices, n_experts)
            rows, ref_counts, state = disp.dispatch(tokens, indices, weights, n_experts)
            ref = disp.combine(experts(rows, ref_counts, state.row_weights), state).detach()
    assert torch.equal(counts, ref_counts) and ours.dtype == ref.dtype
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    else:  # bf16 GEMMs of other row counts may round differently: a couple of bf16 ulps
        scale = 1 + float(ref.float().abs().max())
        torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=2e-2 * scale)


@settings(max_examples=30, deadline=None)
@given(n_tokens=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_decode_moe_runs_a_gemm_only_for_the_chosen_experts(n_tokens, seed, dtype):
    """Up to 12 of 32 experts chosen: a GEMM for each of them, none for the others (torch's grouped_mm, whose
    CPU fallback runs one per group, is left for groups at least half filled)."""
    n_experts, top_k, hidden = 32, 4, 16
    gen = torch.Generator().manual_seed(seed)
    experts = experts_for("fp32", n_experts, hidden, 16, gen).to(dtype)
    indices = routing(n_tokens, n_experts, top_k, gen)
    chosen = len(indices.unique())
    x = torch.randn(n_tokens, hidden, generator=gen, dtype=dtype)
    with torch.no_grad(), mock.patch.object(grouped.torch, "mm", wraps=torch.mm) as mm, \
            mock.patch.object(grouped.F, "grouped_mm", wraps=grouped.F.grouped_mm) as grouped_mm:
        out, _ = LocalDispatcher().run(x, indices, torch.rand(n_tokens, top_k, generator=gen), experts)
    assert mm.call_count == 2 * chosen and not grouped_mm.called  # gate_up and down, per chosen expert
    assert out.shape == (n_tokens, hidden)


def test_few_rows_is_inference_with_at_most_one_pair_per_expert():
    indices = torch.zeros(8, 4, dtype=torch.long)
    with torch.no_grad():
        assert few_rows(indices, 32) and not few_rows(indices, 31)
    assert not few_rows(indices, 32)  # autograd on: training's grouped path
