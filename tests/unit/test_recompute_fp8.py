"""V3's FP8 activation cache under selective recompute: SwiGLU's output is recomputed from the FP8 copies of
gate and up for the down projection's weight gradient (its FP8 input is not kept); what a layer holds is
broken down by label and sums to the measured total."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.model import mla, mlp, moe
from moelib.model.recompute import SwiGLUCache, _Fp8GateUp
from moelib.plan.activations import held_breakdown, held_per_token
from moelib.precision import fp8
from moelib.precision.rows import weighted_sum
from tests.unit.test_recompute import CFG, build, run_layer

E4M3_REL = 2.0 ** -4   # round-to-nearest with 3 mantissa bits (REFERENCE §4)
SUBNORMAL = 2.0 ** -10  # half the smallest subnormal step 2^-9, in units of the tile's scale
E4M3_MAX = fp8.fp8_format("e4m3").fmax
SILU_SLOPE = 1.1        # max |silu'(x)| = 1.0998...


def _input_error_bound(t: torch.Tensor) -> torch.Tensor:
    """How far E4M3 in 1×128 tiles may move each element of t: 2^-4 of it, or half a subnormal step."""
    tiles = t.abs().split(fp8.TILE, dim=-1)
    amax = torch.cat([tile.amax(-1, keepdim=True).expand_as(tile) for tile in tiles], dim=-1)
    return E4M3_REL * t.abs() + SUBNORMAL * amax / E4M3_MAX


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 8), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_recomputed_swiglu_output_within_the_e4m3_bound(rows, scale, seed):
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(rows, 200, generator=g) * scale for _ in range(2))
    again = _Fp8GateUp(gate, up, SwiGLUCache(fp8.quantize)).output()
    exact = F.silu(gate) * up
    g_err, u_err = _input_error_bound(gate), _input_error_bound(up)
    # |silu(g')u' - silu(g)u| <= |silu(g')| |u' - u| + |u| |silu(g') - silu(g)|
    bound = F.silu(gate).abs() * u_err + SILU_SLOPE * g_err * (up.abs() + u_err) + up.abs() * SILU_SLOPE * g_err
    assert torch.all((again - exact).abs() <= bound * (1 + 1e-5) + 1e-30)


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 6), k=st.integers(1, 4), hidden=st.sampled_from([16, 130, 256]),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_combine_keeping_expert_outputs_in_fp8_changes_only_the_gate_gradient_within_the_e4m3_bound(
        tokens, k, hidden, scale, seed):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(tokens, k, hidden, generator=g) * scale).requires_grad_()
    w = torch.rand(tokens, k, generator=g).requires_grad_()
    grad = torch.randn(tokens, hidden, generator=g)
    results = []
    for quantize in (None, fp8.quantize):
        out = weighted_sum(y, w, quantize)
        results.append((out, *torch.autograd.grad(out, (y, w), grad)))
    (out, gy, gw), (out8, gy8, gw8) = results
    assert torch.equal(out8, out) and torch.equal(gy8, gy)
    # grad_w = <grad, y_k>: each y element moves by at most its E4M3 bound
    bound = (grad.abs().unsqueeze(1) * _input_error_bound(y.detach())).sum(-1)
    slack = 1e-5 * (grad.abs().unsqueeze(1) * y.detach().abs()).sum(-1)  # fp32 summation order
    assert torch.all((gw8 - gw).abs() <= bound + slack)


def _no_input_again(monkeypatch):
    """GroupedExperts as before: its down projection keeps its FP8 input."""
    real = moe.swiglu_again
    monkeypatch.setattr(moe, "swiglu_again", lambda *a: (real(*a)[0], None))


def test_down_projection_keeps_no_input_and_only_its_weight_grad_changes(monkeypatch):
    new = run_layer(build("selective", "fp8-emulated"), "moe")
    exact = run_layer(build("selective", "fp8-emulated", fp8_swiglu_cache=False), "moe")
    new_bytes = held_per_token(CFG, "fp8-emulated", "selective", "moe", seq=16)
    _no_input_again(monkeypatch)
    old = run_layer(build("selective", "fp8-emulated"), "moe")
    old_bytes = held_per_token(CFG, "fp8-emulated", "selective", "moe", seq=16)
    down = "layers.1.mlp.experts.down_proj"
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
    assert all(torch.equal(new[2][k], old[2][k]) for k in old[2] if k != down)
    rel = float((new[2][down] - exact[2][down]).norm() / exact[2][down].norm())
    assert 0 < rel < 2 * E4M3_REL  # X' (SwiGLU from E4M3 gate/up) and its own E4M3 tiles: two roundings
    # Per token: top_k rows of the expert width in E4M3 plus one fp32 scale per 128-wide tile.
    inter = CFG.moe_intermediate_size
    assert old_bytes - new_bytes == CFG.num_experts_per_tok * (inter + 4 * -(-inter // fp8.TILE))


@pytest.mark.parametrize("backend, mode", [("fp8-emulated", "selective"), ("bf16", "none")])
def test_breakdown_sums_to_what_the_layer_holds(backend, mode):
    parts = held_breakdown(CFG, backend, mode, "moe", seq=16)
    assert sum(parts.values()) == pytest.approx(held_per_token(CFG, backend, mode, "moe", seq=16), abs=1e-6)
    fp8_labels = {site for (_, site, dtype) in parts if dtype.startswith("float8")}
    if backend.startswith("fp8"):
        assert {"_Fp8GateUp.__init__(SwiGLU gate)", "_Fp8GateUp.__init__(SwiGLU up)"} <= fp8_labels
    else:
        assert not fp8_labels


def test_combine_keeps_expert_outputs_in_fp8_only_the_gate_gradient_changes(monkeypatch):
    new = run_layer(build("selective", "fp8-emulated"), "moe")
    new_bytes = held_per_token(CFG, "fp8-emulated", "selective", "moe", seq=16)
    monkeypatch.setattr(moe.GroupedExperts, "output_quantize", lambda self: None)
    old = run_layer(build("selective", "fp8-emulated"), "moe")
    old_bytes = held_per_token(CFG, "fp8-emulated", "selective", "moe", seq=16)
    assert torch.equal(new[0], old[0])
    gate = "layers.1.mlp.gate.weight"
    changed = {k for k in old[2] if not torch.equal(new[2][k], old[2][k])}
    # The experts' gradients come from the combine's grad_y, which does not read y: unchanged. The gate
    # weights' gradient (and whatever lies upstream of the router) moves.
    assert gate in changed and not {k for k in changed if ".experts." in k or ".shared_experts." in k}
    rel = float((new[2][gate] - old[2][gate]).norm() / old[2][gate].norm())
    assert 0 < rel < E4M3_REL
    # Per token: top_k bf16 rows of the hidden width become E4M3 plus one fp32 scale per 128-wide tile.
    k, h = CFG.num_experts_per_tok, CFG.hidden_size
    assert old_bytes - new_bytes == k * (2 * h) - k * (h + 4 * -(-h // fp8.TILE))


def test_dense_and_shared_down_projections_keep_no_input(monkeypatch):
    new = {kind: held_per_token(CFG, "fp8-emulated", "selective", kind, seq=16) for kind in ("dense", "moe")}
    new_dense = run_layer(build("selective", "fp8-emulated"), "dense")
    real = mlp.swiglu_again
    monkeypatch.setattr(mlp, "swiglu_again", lambda *a: (real(*a)[0], None))
    old = {kind: held_per_token(CFG, "fp8-emulated", "selective", kind, seq=16) for kind in ("dense", "moe")}
    old_dense = run_layer(build("selective", "fp8-emulated"), "dense")
    assert torch.equal(new_dense[0], old_dense[0]) and torch.equal(new_dense[1], old_dense[1])
    down = "layers.0.mlp.down_proj.weight"
    assert all(torch.equal(new_dense[2][k], old_dense[2][k]) for k in old_dense[2] if k != down)
    rel = float((new_dense[2][down] - old_dense[2][down]).norm() / old_dense[2][down].norm())
    assert 0 < rel < 2 * E4M3_REL
    kept = lambda width: width + 4 * -(-width // fp8.TILE)  # E4M3 row + fp32 scale per 128-wide tile
    assert old["dense"] - new["dense"] == kept(CFG.intermediate_size)
    assert old["moe"] - new["moe"] == kept(CFG.n_shared_experts * CFG.moe_intermediate_size)


def test_attention_keeps_one_fp8_copy_of_its_input_for_both_latent_projections(monkeypatch):
    new = run_layer(build("selective", "fp8-emulated"), "moe")
    new_bytes = held_per_token(CFG, "fp8-emulated", "selective", "moe", seq=16)
    monkeypatch.setattr(mla, "shared_input", lambda x: contextlib.nullcontext())
    old = run_layer(build("selective", "fp8-emulated"), "moe")
    old_bytes = held_per_token(CFG, "fp8-emulated", "selective", "moe", seq=16)
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
    assert all(torch.equal(new[2][k], old[2][k]) for k in old[2])
    h = CFG.hidden_size
    assert old_bytes - new_bytes == h + 4 * -(-h // fp8.TILE)
