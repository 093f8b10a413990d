"""Property tests of the pure-PyTorch FP8 core (moelib.precision.fp8): quantisation round trip, scales,
bad input, and the block-scaled GEMM against an fp64 reference with a derived error bound.

Error bounds used throughout (REFERENCE §4). With s the tile's scale_inv, quantisation rounds y = x/s to
the fp8 grid. E4M3 has 3 mantissa bits, so for |y| ≥ 2^-6 (normal) round-to-nearest moves y by at most half
an ulp, ≤ 2^-4·|y|; below 2^-6 the grid is uniform with spacing 2^-9 (subnormals), so the move is at most
2^-10 in y, i.e. 2^-10·s in x. Hence |dequant(quant(x)) − x| ≤ max(2^-4·|x|, 2^-10·s). (For a format
with m mantissa bits and bias b: max(2^-(m+1)·|x|, 2^-(b+m)·s).) The fp32 division x/s and product q·s add
one rounding each (≤ 2^-24 relative), which the small slack factor SLACK covers.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.errors import ConfigError, DataError
from moelib.precision import fp8

SLACK = 1 + 2.0**-16  # two fp32 roundings of ≤ 2^-24 relative, on a bound ≥ 2^-10·s ≥ 2^-20·(|q|·s)
FAST = settings(max_examples=30, deadline=None)
U = 2.0**-24  # fp32 unit roundoff


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def mixed_tensors(draw, max_dim: int = 300, lo: float = -30.0, hi: float = 30.0) -> torch.Tensor:
    """2-D fp32 tensors, 1…max_dim per dim, magnitudes 10^lo…10^hi mixed within tiles, with zeros, all-zero
    stretches and outliers; sometimes bf16."""
    rows, cols = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    g = _gen(draw(st.integers(0, 2**31 - 1)))
    spread = draw(st.sampled_from([0.0, 1.0, 4.0, 12.0, hi - lo]))  # decades of spread inside a row
    centre = torch.empty(rows, 1).uniform_(lo + spread / 2, hi - spread / 2, generator=g)
    exponent = centre + (torch.rand(rows, cols, generator=g) - 0.5) * spread
    sign = torch.randint(0, 2, (rows, cols), generator=g) * 2 - 1
    x = sign * torch.pow(10.0, exponent.double()).float()
    x[torch.rand(rows, cols, generator=g) < draw(st.sampled_from([0.0, 0.1, 0.5]))] = 0.0
    if draw(st.booleans()):  # outliers: a few elements 10^6 larger (still ≤ 10^hi)
        hit = torch.rand(rows, cols, generator=g) < 0.01
        x[hit] = (x[hit] * 1e6).clamp(-(10.0**hi), 10.0**hi)
    if draw(st.booleans()):  # all-zero rows and columns make all-zero tiles in every block shape
        x[torch.randint(0, rows, (max(1, rows // 4),), generator=g)] = 0.0
        x[:, torch.randint(0, cols, (max(1, cols // 4),), generator=g)] = 0.0
    if draw(st.integers(0, 4)) == 0:
        x = x.clamp(-1e30, 1e30).bfloat16()  # bf16 has fp32's exponent range
    return x


def _reference_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Tile amax by slicing, independent of the implementation's padded view."""
    a = x.float().abs()
    if block[1] > 1:
        a = torch.cat([c.amax(1, keepdim=True) for c in a.split(block[1], 1)], 1)
    if block[0] > 1:
        a = torch.cat([r.amax(0, keepdim=True) for r in a.split(block[0], 0)], 0)
    return a


def _round_trip_bound(x: torch.Tensor, s_full: torch.Tensor, fmt: str) -> torch.Tensor:
    f = fp8.FORMATS[fmt]
    rel, abs_ = 2.0 ** -(f.mantissa_bits + 1), 2.0 ** -(f.exponent_bias + f.mantissa_bits)
    return torch.maximum(x.abs().double() * rel, s_full.double() * abs_) * SLACK


@FAST
@given(x=mixed_tensors(), block=st.sampled_from(fp8.BLOCKS), pow2=st.booleans(), fmt=st.sampled_from(["e4m3", "e5m2"]))
def test_round_trip_within_tile_bound(x, block, pow2, fmt):
    data, scale_inv = fp8.quantize(x, block, fmt, pow2)
    assert data.shape == x.shape and data.dtype == fp8.FORMATS[fmt].dtype
    assert scale_inv.shape == fp8.scale_grid(x.shape, block) and scale_inv.dtype == torch.float32
    assert bool(torch.isfinite(scale_inv).all()) and bool((scale_inv > 0).all())
    back = fp8.dequantize(data, scale_inv, block)
    assert bool(torch.isfinite(back).all())
    s_full = fp8.expand_scale(scale_inv, block, x.shape)
    err = (back.double() - x.double()).abs()
    assert bool((err <= _round_trip_bound(x, s_full, fmt)).all())


@FAST
@given(x=mixed_tensors(), block=st.sampled_from(fp8.BLOCKS), pow2=st.booleans())
def test_scale_is_tile_amax_over_448(x, block, pow2):
    _, scale_inv = fp8.quantize(x, block, pow2_scale=pow2)
    amax = _reference_amax(x, block)
    expect = torch.where(amax == 0, torch.ones_like(amax), (amax / 448.0).clamp(min=fp8.MIN_SCALE))
    if not pow2:
        assert torch.equal(scale_inv, expect)
        return
    # ue8m0: the smallest power of two ≥ amax/448 (frexp mantissa exactly 0.5 means a power of two)
    assert bool((torch.frexp(scale_inv).mantissa == 0.5).all())
    assert bool((scale_inv >= expect).all()) and bool((scale_inv < 2 * expect).all())


@FAST
@given(x=mixed_tensors(), block=st.sampled_from(fp8.BLOCKS))
def test_pow2_requantise_reproduces_exactly(x, block):
    """With power-of-2 scales, dequantised values are exact in fp32, and quantising them again gives back
    the same values. Data and scale come back bit for bit, except in tiles whose largest |data| is 224
    (an amax that rounded down to 224): there the new scale is half and the data doubles, same values."""
    data, scale_inv = fp8.quantize(x, block, pow2_scale=True)
    once = fp8.dequantize(data, scale_inv, block)
    data2, scale2 = fp8.quantize(once, block, pow2_scale=True)
    assert torch.equal(fp8.dequantize(data2, scale2, block), once)
    full_range = _reference_amax(data.float(), block) > 224
    assert torch.equal(scale2[full_range], scale_inv[full_range])
    assert bool(((scale2 == scale_inv) | (scale2 == scale_inv / 2)).all())
    same = fp8.expand_scale(full_range.float(), block, x.shape) > 0
    assert torch.equal(data2.view(torch.uint8)[same], data.view(torch.uint8)[same])


@pytest.mark.parametrize("block", fp8.BLOCKS)
@pytest.mark.parametrize("pow2", [False, True])
def test_all_zero_tiles_give_zeros_and_unit_scale(block, pow2):
    x = torch.zeros(130, 260)
    x[129, 259] = 3.0  # one non-zero corner tile; the rest are all zero
    data, scale_inv = fp8.quantize(x, block, pow2_scale=pow2)
    assert torch.equal(fp8.dequantize(data, scale_inv, block)[:129, :], torch.zeros(129, 260))
    zero_tiles = _reference_amax(x, block) == 0
    assert bool((scale_inv[zero_tiles] == 1.0).all()) and bool(torch.isfinite(scale_inv).all())


def test_tiny_tiles_get_floor_scale_not_zero():
    """amax so small that amax/448 would be subnormal or zero in fp32 (incl. fp32 subnormal input)."""
    x = torch.tensor([[1e-40, -3e-45, 0.0], [5e-37, 1e-38, 2e-37]])
    data, scale_inv = fp8.quantize(x, (1, 128))
    assert torch.equal(scale_inv, torch.full((2, 1), fp8.MIN_SCALE))
    back = fp8.dequantize(data, scale_inv, (1, 128))
    # q·s lands in fp32's subnormal range here, where rounding is absolute: half of 2^-149
    bound = _round_trip_bound(x, torch.full_like(x, fp8.MIN_SCALE), "e4m3") + 2.0**-150
    assert bool(((back.double() - x.double()).abs() <= bound).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("block", fp8.BLOCKS)
def test_non_finite_input_raises_naming_tensor(bad, block):
    x = torch.randn(5, 200)
    x[3, 150] = bad
    with pytest.raises(DataError, match="grad_output.*NaN/Inf"):
        fp8.quantize(x, block, name="grad_output")


@pytest.mark.parametrize("block", [(1, 64), (64, 64), (1, 1), (128, 256), (2, 128)])
def test_unsupported_block_raises(block):
    with pytest.raises(ConfigError, match="block"):
        fp8.quantize(torch.ones(4, 4), block)


@pytest.mark.parametrize("x", [torch.ones(4, 4, dtype=torch.float64), torch.ones(4, 4, dtype=torch.int32),
                               torch.ones(4, 4).to(torch.float8_e4m3fn), torch.ones(8), torch.ones(2, 2, 2)])
def test_unsupported_input_raises(x):
    with pytest.raises(DataError, match="weight"):
        fp8.quantize(x, name="weight")


def test_unsupported_format_and_gemm_shapes_raise():
    with pytest.raises(ConfigError, match="format"):
        fp8.quantize(torch.ones(2, 2), fmt="e4m3fnuz")
    q, s = fp8.quantize(torch.ones(4, 256), (128, 1))
    with pytest.raises(ConfigError, match="block"):
        fp8.fp8_gemm(q, s, q, s, a_block=(128, 1), b_block=(128, 1))
    qa, sa = fp8.quantize(torch.ones(4, 256))
    qb, sb = fp8.quantize(torch.ones(4, 128), (128, 128))
    with pytest.raises(DataError, match="share K"):
        fp8.fp8_gemm(qa, sa, qb, sb)
    with pytest.raises(DataError, match="b_scale_inv"):
        fp8.fp8_gemm(qa, sa, qa, sa)  # b in 1×128 tiles, declared as 128×128 blocks


@FAST
@given(x=mixed_tensors(max_dim=260), pow2=st.booleans())
def test_transposed_quantisation(x, pow2):
    """quantize_transposed(x) is quantize(xᵀ) in 1×128 tiles; re-tiling cached fp8 data for the
    weight-grad GEMM composes two round trips, so its error is bounded by the sum of both bounds."""
    data_t, scale_t = fp8.quantize_transposed(x, pow2_scale=pow2)
    ref_data, ref_scale = fp8.quantize(x.t().contiguous(), (1, 128), pow2_scale=pow2)
    assert torch.equal(data_t.view(torch.uint8), ref_data.view(torch.uint8)) and torch.equal(scale_t, ref_scale)

    data, scale_inv = fp8.quantize(x, (1, 128), pow2_scale=pow2)
    re_data, re_scale = fp8.requantize_transposed(data, scale_inv, (1, 128), pow2_scale=pow2)
    assert re_data.shape == (x.shape[1], x.shape[0]) and re_scale.shape == fp8.scale_grid(re_data.shape, (1, 128))
    once = fp8.dequantize(data, scale_inv).t()
    twice = fp8.dequantize(re_data, re_scale)
    bound1 = _round_trip_bound(x, fp8.expand_scale(scale_inv, (1, 128), x.shape), "e4m3").t()
    bound2 = _round_trip_bound(once, fp8.expand_scale(re_scale, (1, 128), twice.shape), "e4m3")
    assert bool(((twice.double() - x.t().double()).abs() <= bound1 + bound2).all())


# ---- block-scaled GEMM ---------------------------------------------------------------------------------


def _gemm_bound(a, sa_full, b, sb_full, k: int) -> torch.Tensor:
    """|fp8_gemm(a, b) − a·bᵀ| bound, elementwise, in fp64.

    Quantisation: a = ã + dₐ with |dₐ| ≤ Eₐ = max(2^-4|a|, 2^-10 sₐ) (round trip above), likewise b, so
      |a·b − ã·b̃| ≤ |a|E_b + E_a|b| + E_aE_b per product, summed over k.
    Arithmetic: products of two fp8 values are exact in fp32; a 128-term fp32 partial sum errs by at most
    γ₁₂₇·Σ|terms| (γₙ = nu/(1−nu), u = 2^-24), scaling by fl(sₐ·s_b) adds two roundings, and folding the
    ⌈K/128⌉ partials into the accumulator adds γ_KB: together ≤ γ_(128+KB+2)·Σ|ã||b̃|, with |ã| ≤ |a| + Eₐ.
    """
    a, b = a.double(), b.double()
    ea = torch.maximum(a.abs() * 2.0**-4, sa_full.double() * 2.0**-10) * SLACK
    eb = torch.maximum(b.abs() * 2.0**-4, sb_full.double() * 2.0**-10) * SLACK
    quant = a.abs() @ eb.t() + ea @ b.abs().t() + ea @ eb.t()
    n = 128 + -(-k // 128) + 2
    gamma = n * U / (1 - n * U)
    return quant + gamma * ((a.abs() + ea) @ (b.abs() + eb).t())


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 300), n=st.integers(1, 300), k=st.integers(1, 300), b_block=st.sampled_from(fp8.GEMM_BLOCKS),
       seed=st.integers(0, 2**31 - 1), zeros=st.sampled_from([0.0, 0.3]))
def test_fp8_gemm_within_derived_bound(m, n, k, b_block, seed, zeros):
    g = _gen(seed)

    def operand(rows):  # magnitudes 2^-20…2^20 mixed within tiles (small ones sit on the subnormal term)
        x = torch.randn(rows, k, generator=g) * torch.pow(2.0, torch.randint(-20, 21, (rows, k), generator=g))
        x[torch.rand(rows, k, generator=g) < zeros] = 0.0
        return x

    a, b = operand(m), operand(n)
    qa, sa = fp8.quantize(a, (1, 128))
    qb, sb = fp8.quantize(b, b_block)
    c = fp8.fp8_gemm(qa, sa, qb, sb, torch.float32, b_block=b_block)
    assert c.shape == (m, n) and c.dtype == torch.float32
    bound = _gemm_bound(a, fp8.expand_scale(sa, (1, 128), a.shape), b, fp8.expand_scale(sb, b_block, b.shape), k)
    assert bool(((c.double() - a.double() @ b.double().t()).abs() <= bound).all())
    # bf16 output is the fp32 result rounded once (8 significant bits: unit roundoff 2^-8)
    c16 = fp8.fp8_gemm(qa, sa, qb, sb, torch.bfloat16, b_block=b_block)
    assert c16.dtype == torch.bfloat16
    assert bool(((c16.double() - c.double()).abs() <= c.double().abs() * 2.0**-8).all())


def test_fp8_gemm_weight_transposed_for_input_grad():
    """dgrad uses Wᵀ: the transpose of W's 128×128 blocks is (data.t(), scale_inv.t()), no requantisation."""
    g = _gen(1)
    w, dy = torch.randn(200, 300, generator=g), torch.randn(70, 200, generator=g)
    qw, sw = fp8.quantize(w, (128, 128))
    qg, sg = fp8.quantize(dy, (1, 128))
    c = fp8.fp8_gemm(qg, sg, qw.t(), sw.t(), torch.float32)
    expect = fp8.dequantize(qg, sg).double() @ fp8.dequantize(qw, sw, (128, 128)).double()
    n = 128 + 2 + 2
    assert bool(((c.double() - expect).abs() <= n * U * 1.01 * (
        fp8.dequantize(qg, sg).abs().double() @ fp8.dequantize(qw, sw, (128, 128)).abs().double())).all())


def _round_to_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to `bits` significant bits, nearest-even (a low-precision accumulator register)."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.round(mantissa * 2.0**bits) / 2.0**bits, exponent)


def test_fp8_gemm_error_does_not_grow_with_k():
    """V3 §3.3.2: Hopper's fp8 MMA keeps ~14 bits in its accumulator, so an unpromoted K=4096 sum can be ~2%
    off; promoting to fp32 every 128 terms fixes it. All-positive inputs are the worst case (the running
    sum grows and swallows the addends). Against the exact product of the dequantised operands, fp8_gemm's
    error stays at fp32 level for K = 128…8192, while a simulated 14-bit accumulator's grows with K."""
    g = _gen(0)
    promoted, unpromoted, total = {}, {}, {}
    for k in (128, 512, 2048, 8192):
        a, b = torch.rand(16, k, generator=g), torch.rand(16, k, generator=g)
        qa, sa = fp8.quantize(a, (1, 128))
        qb, sb = fp8.quantize(b, (128, 128))
        da, db = fp8.dequantize(qa, sa).double(), fp8.dequantize(qb, sb, (128, 128)).double()
        exact = da @ db.t()
        c = fp8.fp8_gemm(qa, sa, qb, sb, torch.float32).double()
        acc = torch.zeros(16, 16, dtype=torch.float64)
        for i in range(k):
            acc = _round_to_bits(acc + da[:, None, i] * db[None, :, i], 14)
        promoted[k] = ((c - exact).abs() / exact).max().item()
        unpromoted[k] = ((acc - exact).abs() / exact).max().item()
        total[k] = ((c - a.double() @ b.double().t()).abs() / exact).max().item()
    assert max(promoted.values()) < 2.0**-20, promoted
    assert unpromoted[8192] > 1e-3 and unpromoted[8192] > 10 * unpromoted[128], unpromoted
    # Against the unquantised fp64 product the error is quantisation noise, which averages out with K.
    assert total[8192] <= total[128], total


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(0, 150), min_size=1, max_size=5), n=st.integers(1, 200), k=st.integers(1, 260),
       seed=st.integers(0, 2**31 - 1))
def test_fp8_grouped_gemm_matches_per_expert_gemm(sizes, n, k, seed):
    g = _gen(seed)
    counts = torch.tensor(sizes)
    a = torch.randn(sum(sizes), k, generator=g)
    w = torch.randn(len(sizes), n, k, generator=g)
    qa, sa = fp8.quantize(a)
    qw, sw = zip(*(fp8.quantize(w[e], (128, 128)) for e in range(len(sizes))))
    out = fp8.fp8_grouped_gemm(qa, sa, torch.stack(qw), torch.stack(sw), counts, torch.float32)
    assert out.shape == (sum(sizes), n)
    start = 0
    for e, size in enumerate(sizes):
        rows = slice(start, start + size)
        assert torch.equal(out[rows], fp8.fp8_gemm(qa[rows], sa[rows], qw[e], sw[e], torch.float32))
        start += size


def test_grouped_gemm_rejects_bad_counts():
    qa, sa = fp8.quantize(torch.ones(10, 128))
    qw, sw = fp8.quantize(torch.ones(64, 128), (128, 128))
    with pytest.raises(DataError, match="counts"):
        fp8.fp8_grouped_gemm(qa, sa, qw[None], sw[None], torch.tensor([9]))
