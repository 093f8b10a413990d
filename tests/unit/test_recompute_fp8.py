"""V3's FP8 activation cache under selective recompute: SwiGLU's output is recomputed from the FP8 copies of
gate and up for the down projection's weight gradient (its FP8 input is not kept); the routed experts fold
their gate values into that output, so the combine keeps nothing; what a layer holds is broken down by label
and sums to the measured total."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.model import mla, mlp, moe, router
from moelib.model.moe import GroupedExperts
from moelib.model.recompute import SwiGLUCache, _Fp8GateUp
from moelib.plan.activations import held_breakdown, held_per_token
from moelib.precision import fp8
from moelib.precision.backends import Linear, get_backend
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
    again = _Fp8GateUp(gate, up, None, SwiGLUCache(fp8.quantize)).output()
    exact = F.silu(gate) * up
    g_err, u_err = _input_error_bound(gate), _input_error_bound(up)
    # |silu(g')u' - silu(g)u| <= |silu(g')| |u' - u| + |u| |silu(g') - silu(g)|
    bound = F.silu(gate).abs() * u_err + SILU_SLOPE * g_err * (up.abs() + u_err) + up.abs() * SILU_SLOPE * g_err
    assert torch.all((again - exact).abs() <= bound * (1 + 1e-5) + 1e-30)


def _tile_amax(t: torch.Tensor) -> torch.Tensor:
    """Each element's 1×128 tile's amax."""
    return torch.cat([tile.amax(-1, keepdim=True).expand_as(tile) for tile in t.abs().split(fp8.TILE, dim=-1)], -1)


def _experts_with_and_without_probs(backend_name: str, rows: int, inter: int, scale: float, seed: int):
    """(rows scaled inside the expert, unscaled rows, probs, SwiGLU's output, |down|) of one expert."""
    g = torch.Generator().manual_seed(seed)
    backend = get_backend(backend_name)
    experts = GroupedExperts(1, 64, inter, backend)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(1, 2 * inter, 64, generator=g) * 0.3)
        experts.down_proj.copy_(torch.randn(1, 64, inter, generator=g) * 0.3)
    x = torch.randn(rows, 64, generator=g) * scale
    probs = torch.rand(rows, generator=g) * 4 + 1e-3
    counts = torch.tensor([rows])
    with torch.no_grad(), backend.autocast():
        scaled = experts(x, counts, probs)
        plain = experts(x, counts, torch.ones(rows))
        gate, up = backend.grouped_linear(x, experts.gate_up_proj, counts, pow2_input=True).chunk(2, -1)
        swiglu = F.silu(gate) * up
    return scaled.double(), plain.double(), probs.double(), swiglu.double(), experts.down_proj[0].detach().abs()


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), inter=st.sampled_from([8, 200]), scale=st.floats(1e-2, 1e2),
       seed=st.integers(0, 2**16))
def test_gate_value_folded_into_swiglu_moves_fp32_outputs_by_gemm_rounding_only(rows, inter, scale, seed):
    """p * down(s) against down(p * s) in fp32: each is within gamma_n = n u / (1 - n u) (u = 2^-24, n = I + 2:
    the I-term dot product, the scaling, its rounding) of p * (|down| @ |s|) around the exact value."""
    scaled, plain, probs, s, down = _experts_with_and_without_probs("fp32", rows, inter, scale, seed)
    n, u = inter + 2, 2.0 ** -24
    gamma = n * u / (1 - n * u)
    bound = 2 * gamma * probs.unsqueeze(-1) * (s.abs() @ down.double().t())
    assert torch.all((scaled - probs.unsqueeze(-1) * plain).abs() <= bound)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), inter=st.sampled_from([8, 200]), scale=st.floats(1e-2, 1e2),
       seed=st.integers(0, 2**16))
def test_gate_value_folded_into_swiglu_moves_fp8_outputs_by_the_e4m3_quantisation_of_the_scaled_input(
        rows, inter, scale, seed):
    """FP8-emulated: the down projection quantises p * s (rounded to bf16 first) instead of s. Each E4M3 element
    is within 2^-4 of its value plus half a subnormal step of its tile (2^-10 amax / 448), so the two inputs
    differ from p * s by at most 2 * 2^-4 + 2^-8 (both bf16 roundings) of |p s| plus two subnormal terms; the
    bf16 outputs add 2^-8 (two roundings of 2^-9) of p * |W'| @ |s|, |W'| <= (1 + 2^-4) |W| + a subnormal."""
    scaled, plain, probs, s, down = _experts_with_and_without_probs("fp8-emulated", rows, inter, scale, seed)
    w = (down * (1 + E4M3_REL) + SUBNORMAL * down.max() / E4M3_MAX).double()
    p = probs.unsqueeze(-1)
    elem = (2 * E4M3_REL + 2.0 ** -8) * s.abs() + 2 * SUBNORMAL * (1 + 2.0 ** -8) * _tile_amax(s) / E4M3_MAX
    bound = p * (elem @ w.t()) + 2.0 ** -8 * (1 + 2 * E4M3_REL) * p * (s.abs() @ w.t())
    assert torch.all((scaled - p * plain).abs() <= bound * (1 + 1e-6) + 1e-30)


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


def test_the_combine_keeps_nothing_per_routed_slot_but_the_gate_value():
    """Per routed (token, slot) the MoE layer keeps the dispatched token (the first grouped GEMM's E4M3 input and
    its scale per 128-wide tile), SwiGLU's gate and up in E4M3 with fp32 scales, and the fp32 gate value: no
    copy of the experts' outputs (the gate value's gradient comes from SwiGLU's recomputed output)."""
    parts = held_breakdown(CFG, "fp8-emulated", "selective", "moe", seq=16)
    per_sequence = ("sequence_balance_loss", "MoE.finish")  # [B, E] balance statistics, not per token
    routed = sum(b for (module, site, dtype), b in parts.items()
                 if module == "mlp" and dtype != "int64" and not site.startswith(per_sequence))
    k, h, i = CFG.num_experts_per_tok, CFG.hidden_size, CFG.moe_intermediate_size
    tiles = lambda width: -(-width // fp8.TILE)
    assert routed == pytest.approx(k * (h + 4 * tiles(h)) + 2 * k * (i + 4 * tiles(i)) + 4 * k, abs=1e-6)


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


def test_router_keeps_no_copy_of_the_normed_input(monkeypatch):
    """Under selective recompute the router's gate GEMM keeps the norm's recomputation (whose region keeps the
    residual anyway) instead of the fp32 normed input: every number the same, 4 * hidden bytes per token less."""
    new = run_layer(build("selective", "fp8-emulated"), "moe")
    new_bytes = held_per_token(CFG, "fp8-emulated", "selective", "moe", seq=16)
    monkeypatch.setattr(router, "linear_input_again", lambda x, weight, again=None: F.linear(x, weight))
    old = run_layer(build("selective", "fp8-emulated"), "moe")
    old_bytes = held_per_token(CFG, "fp8-emulated", "selective", "moe", seq=16)
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
    assert new[2].keys() == old[2].keys() and all(torch.equal(new[2][k], old[2][k]) for k in old[2])
    assert old_bytes - new_bytes == 4 * CFG.hidden_size


@pytest.mark.parametrize("backend", ["fp8-emulated", "bf16"])
def test_the_residual_after_attention_is_rebuilt_not_kept(monkeypatch, backend):
    """Under selective recompute the post-attention norm keeps a function rebuilding its input, the fp32
    residual h = x + o_proj(a), from what is kept anyway (x by the input norm, o_proj's input by o_proj)
    instead of h: every number the same, 4 * hidden bytes per token less in both kinds of layer."""
    kinds = ("dense", "moe")
    new = {kind: run_layer(build("selective", backend), kind) for kind in kinds}
    new_bytes = {kind: held_per_token(CFG, backend, "selective", kind, seq=16) for kind in kinds}
    monkeypatch.setattr(Linear, "forward_again", lambda self, x: (self(x), None))
    for kind in kinds:
        old = run_layer(build("selective", backend), kind)
        assert torch.equal(new[kind][0], old[0]) and torch.equal(new[kind][1], old[1])
        assert all(torch.equal(new[kind][2][k], old[2][k]) for k in old[2])
        old_bytes = held_per_token(CFG, backend, "selective", kind, seq=16)
        assert old_bytes - new_bytes[kind] == 4 * CFG.hidden_size, kind


def test_mlp_gate_and_up_keep_the_norms_recomputation_instead_of_their_fp8_input(monkeypatch):
    """Under the FP8 SwiGLU cache the dense MLP's and the shared experts' gate and up projections keep the
    post-attention norm's recomputation instead of their one FP8 input copy: their weight gradients tile the
    recomputed input once (rounding only), nothing else changes, and each layer keeps that copy less."""
    kinds = ("dense", "moe")
    new = {kind: run_layer(build("selective", "fp8-emulated"), kind) for kind in kinds}
    new_bytes = {kind: held_per_token(CFG, "fp8-emulated", "selective", kind, seq=16) for kind in kinds}
    real = mlp.MLP.forward
    monkeypatch.setattr(mlp.MLP, "forward", lambda self, x, x_again=None: real(self, x))
    h = CFG.hidden_size
    for kind in kinds:
        old = run_layer(build("selective", "fp8-emulated"), kind)
        assert torch.equal(new[kind][0], old[0]) and torch.equal(new[kind][1], old[1])
        changed = {k for k in old[2] if not torch.equal(new[kind][2][k], old[2][k])}
        assert changed and all(k.endswith(("gate_proj.weight", "up_proj.weight")) for k in changed), changed
        for k in changed:
            assert float((new[kind][2][k] - old[2][k]).norm() / old[2][k].norm()) < 2 * E4M3_REL
        old_bytes = held_per_token(CFG, "fp8-emulated", "selective", kind, seq=16)
        assert old_bytes - new_bytes[kind] == h + 4 * -(-h // fp8.TILE), kind
