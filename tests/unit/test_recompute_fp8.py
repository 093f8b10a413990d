"""V3's FP8 activation cache under selective recompute: SwiGLU's output is recomputed from the FP8 copies of
gate and up for the down projection's weight gradient (its FP8 input is not kept); what a layer holds is
broken down by label and sums to the measured total."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.model import moe
from moelib.model.recompute import SwiGLUCache, _Fp8GateUp
from moelib.plan.activations import held_breakdown, held_per_token
from moelib.precision import fp8
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
