"""moelib_cuda's Triton kernels against the pure-PyTorch core (moelib.precision.fp8).

Without a GPU they run in Triton's CPU interpreter: importing a moelib_cuda kernel module sets TRITON_INTERPRET=1
before triton is imported, so this works whatever other test files imported first. Shapes stay small because
the interpreter runs each program instance in numpy. Quantisation must match bit for bit; GEMMs match
within the fp32 summation-order bound derived in tests/property/test_fp8.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moelib_cuda
from moelib.errors import ConfigError, DataError
from moelib.precision import fp8

_reason = moelib_cuda.triton_unavailable_reason()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

from moelib.precision import fp8_triton  # noqa: E402  (needs Triton, checked just above)
from moelib_cuda import formats, gemm, quant  # noqa: E402

DEVICE = "cpu" if moelib_cuda.interpreting() else "cuda"
FEW = settings(max_examples=12, deadline=None)
U = 2.0**-24


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _assert_same(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert got[0].dtype == want[0].dtype and got[0].shape == want[0].shape
    assert torch.equal(_bits(got[0]).cpu(), _bits(want[0]).cpu()), "fp8 data differs"
    assert torch.equal(got[1].cpu(), want[1].cpu()), "scale_inv differs"


@st.composite
def mixed(draw, max_dim: int = 300) -> torch.Tensor:
    """Magnitudes 1e-30…1e30 mixed within tiles, zeros, all-zero tiles; fp32, bf16 or fp16."""
    rows, cols = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    spread = draw(st.sampled_from([1.0, 10.0, 60.0]))
    exponent = (torch.rand(rows, cols, generator=g) - 0.5) * spread
    x = torch.randn(rows, cols, generator=g) * torch.pow(10.0, exponent.double()).float()
    x[torch.rand(rows, cols, generator=g) < 0.2] = 0.0
    x[: max(1, rows // 3)] = 0.0
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    if dtype == torch.float16:  # keep within fp16's range
        x = (x / x.abs().max().clamp(min=1) * 1e4)
    return x.to(dtype).to(DEVICE)


def test_importing_the_reference_leaves_triton_alone():
    """moelib.precision.fp8 takes its formats from moelib_cuda.formats: that must neither import triton nor
    switch it to the interpreter (only importing a kernel module does)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import os, sys, torch; import moelib.precision.fp8; "
            "assert 'triton' not in sys.modules and 'TRITON_INTERPRET' not in os.environ; "
            "from moelib_cuda import quant; "
            "assert torch.cuda.is_available() or os.environ['TRITON_INTERPRET'] == '1'")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_kernels_raise_their_own_error_and_moelib_turns_it_into_data_error():
    x = torch.ones(4, 4, device=DEVICE)
    x[0, 0] = float("nan")
    with pytest.raises(formats.KernelInputError, match="x has non-finite"):
        quant.quantize(x, name="x")
    with pytest.raises(DataError, match="x has non-finite"):
        fp8_triton.quantize(x, name="x")


def test_interpreter_is_on_without_gpu():
    if not torch.cuda.is_available():
        assert moelib_cuda.interpreting() and moelib_cuda.triton_available()


_IMPORTED_FIRST = """
from torch.utils._triton import has_triton
has_triton()  # imports triton.language before moelib_cuda can set TRITON_INTERPRET, as torch.compile does
import torch, moelib_cuda
from moelib_cuda import gemm, quant
from moelib.precision import fp8
x = torch.randn(40, 200)
got, want = quant.quantize(x), fp8.quantize(x)
assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])
w = fp8.quantize(torch.randn(30, 200), (128, 128))
assert (gemm.fp8_gemm(*got, *w, torch.float32) - fp8.fp8_gemm(*want, *w, torch.float32)).abs().max() < 1e-3
"""


@pytest.mark.slow
def test_interpreter_works_when_triton_was_imported_first():
    if torch.cuda.is_available():
        pytest.skip("only the CPU interpreter depends on import order")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _IMPORTED_FIRST], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@FEW
@given(x=mixed(), block=st.sampled_from(fp8.BLOCKS), fmt=st.sampled_from(["e4m3", "e5m2"]), pow2=st.booleans())
def test_quantize_bit_identical(x, block, fmt, pow2):
    _assert_same(quant.quantize(x, block, fmt, pow2), fp8.quantize(x, block, fmt, pow2))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_rounding_of_every_midpoint(fmt):
    """Every fp8 value, every midpoint between neighbours and the fp32 values just either side of each
    midpoint, both signs: with fmax in every row the scale is exactly 1, so this checks the in-kernel
    round-to-nearest-even cast against torch's cast, ties included."""
    f = fp8.FORMATS[fmt]
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(f.dtype).float()
    values = values[torch.isfinite(values) & (values >= 0)].unique()  # sorted, 0 … fmax
    mids = (values[:-1] + values[1:]) / 2  # exact: at most one more significant bit
    cases = torch.cat([values, mids, torch.nextafter(mids, torch.zeros_like(mids)),
                       torch.nextafter(mids, torch.full_like(mids, 1e9))])
    cases = torch.cat([cases, -cases])
    rows = -(-cases.numel() // 127)
    x = torch.zeros(rows * 127)
    x[: cases.numel()] = cases
    x = torch.cat([torch.full((rows, 1), f.fmax), x.view(rows, 127)], 1).to(DEVICE)
    got, want = quant.quantize(x, (1, 128), fmt), fp8.quantize(x, (1, 128), fmt)
    assert bool((want[1] == 1.0).all())
    assert torch.equal(want[0].float().cpu(), x.cpu().to(f.dtype).float())  # the core is torch's own cast
    _assert_same(got, want)


@FEW
@given(x=mixed(max_dim=200), pow2=st.booleans())
def test_quantize_transposed_bit_identical(x, pow2):
    _assert_same(quant.quantize_transposed(x, pow2_scale=pow2), fp8.quantize_transposed(x, pow2_scale=pow2))


@FEW
@given(x=mixed(max_dim=200), block=st.sampled_from(fp8.BLOCKS), pow2=st.booleans())
def test_requantize_transposed_bit_identical(x, block, pow2):
    data, scale_inv = fp8.quantize(x, block, pow2_scale=pow2)
    _assert_same(quant.requantize_transposed(data, scale_inv, block, pow2_scale=pow2),
                 fp8.requantize_transposed(data, scale_inv, block, pow2_scale=pow2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("block", fp8.BLOCKS)
def test_non_finite_raises_naming_tensor(bad, block):
    x = torch.randn(130, 150)
    x[129, 140] = bad
    with pytest.raises(DataError, match="activation.*NaN/Inf"):
        fp8_triton.quantize(x.to(DEVICE), block, name="activation")
    with pytest.raises(DataError, match="activation"):
        fp8_triton.quantize_transposed(x.to(DEVICE), name="activation")


def test_bad_block_and_dtype_raise():
    with pytest.raises(ConfigError, match="block"):
        fp8_triton.quantize(torch.ones(4, 4, device=DEVICE), (64, 64))
    with pytest.raises(DataError, match="x "):
        fp8_triton.quantize(torch.ones(4, 4, dtype=torch.float64, device=DEVICE), name="x")
    with pytest.raises(ConfigError, match="format"):
        fp8_triton.quantize(torch.ones(4, 4, device=DEVICE), fmt="e3m4")


def test_all_zero_and_empty():
    z = torch.zeros(3, 200, device=DEVICE)
    data, scale_inv = quant.quantize(z)
    assert torch.equal(scale_inv.cpu(), torch.ones(3, 2)) and not bool(data.float().any())
    data, scale_inv = quant.quantize(torch.zeros(0, 5, device=DEVICE))
    assert data.shape == (0, 5) and scale_inv.shape == (0, 1)


# ---- GEMMs -------------------------------------------------------------------------------------------


def _accumulation_tol(da: torch.Tensor, db: torch.Tensor, k: int) -> torch.Tensor:
    """Both implementations are within γ_(128+KB+2)·Σ|ã||b̃| of the exact product of the dequantised
    operands (see test_fp8._gemm_bound), so they differ by at most twice that."""
    n = 128 + -(-k // 128) + 2
    return 2 * n * U / (1 - n * U) * (da.double().abs() @ db.double().abs().t())


def _operands(m, n, k, b_block, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g) * torch.pow(2.0, torch.randint(-8, 9, (m, k), generator=g))
    b = torch.randn(n, k, generator=g) * torch.pow(2.0, torch.randint(-8, 9, (n, k), generator=g))
    qa, sa = fp8.quantize(a, (1, 128))
    qb, sb = fp8.quantize(b, b_block)
    return qa, sa, qb, sb


@FEW
@given(m=st.integers(1, 150), n=st.integers(1, 150), k=st.integers(1, 300), b_block=st.sampled_from(fp8.GEMM_BLOCKS),
       seed=st.integers(0, 2**31 - 1))
def test_gemm_matches_emulated(m, n, k, b_block, seed):
    qa, sa, qb, sb = _operands(m, n, k, b_block, seed)
    want = fp8.fp8_gemm(qa, sa, qb, sb, torch.float32, b_block=b_block)
    on = [t.to(DEVICE) for t in (qa, sa, qb, sb)]
    got = gemm.fp8_gemm(*on, torch.float32, b_block=b_block, block_m=32, block_n=64).cpu()
    tol = _accumulation_tol(fp8.dequantize(qa, sa), fp8.dequantize(qb, sb, b_block), k)
    assert got.shape == want.shape and bool(((got.double() - want.double()).abs() <= tol).all())


def test_gemm_transposed_weight_bf16_out_and_native_fp8_path(monkeypatch):
    """dgrad's Wᵀ operand (a strided view), bf16 output, and the sm89+ code path that feeds fp8 straight
    to tl.dot (the interpreter widens fp8 to fp16 inside tl.dot, so it runs here too)."""
    g = torch.Generator().manual_seed(3)
    qw, sw = fp8.quantize(torch.randn(200, 130, generator=g), (128, 128))
    qg, sg = fp8.quantize(torch.randn(40, 200, generator=g))
    want = fp8.fp8_gemm(qg, sg, qw.t(), sw.t(), torch.float32)
    tol = _accumulation_tol(fp8.dequantize(qg, sg), fp8.dequantize(qw, sw, (128, 128)).t(), 200)
    args = [t.to(DEVICE) for t in (qg, sg, qw.t(), sw.t())]
    for native in (False, True):
        monkeypatch.setattr(gemm, "_fp8_mma", lambda a, b, native=native: native)
        got = gemm.fp8_gemm(*args, torch.float32).cpu()
        assert bool(((got.double() - want.double()).abs() <= tol).all())
        got16 = gemm.fp8_gemm(*args).cpu()
        assert got16.dtype == torch.bfloat16
        # one more rounding, to bf16 (unit roundoff 2^-8), of a value within tol of want
        bf16_tol = tol + (want.double().abs() + tol) * 2.0**-8
        assert bool(((got16.double() - want.double()).abs() <= bf16_tol).all())


@settings(max_examples=8, deadline=None)
@given(sizes=st.lists(st.integers(0, 100), min_size=1, max_size=4), n=st.integers(1, 130),
       k=st.integers(1, 260), seed=st.integers(0, 2**31 - 1))
def test_grouped_gemm_matches_emulated(sizes, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(sizes)
    qa, sa = fp8.quantize(torch.randn(sum(sizes), k, generator=g))
    qw, sw = zip(*(fp8.quantize(torch.randn(n, k, generator=g), (128, 128)) for _ in sizes))
    qw, sw = torch.stack(qw), torch.stack(sw)
    want = fp8.fp8_grouped_gemm(qa, sa, qw, sw, counts, torch.float32)
    got = gemm.fp8_grouped_gemm(*(t.to(DEVICE) for t in (qa, sa, qw, sw, counts)), torch.float32,
                                block_m=32, block_n=64).cpu()
    assert got.shape == want.shape
    start = 0
    for e, size in enumerate(sizes):
        rows = slice(start, start + size)
        tol = _accumulation_tol(fp8.dequantize(qa[rows], sa[rows]), fp8.dequantize(qw[e], sw[e], (128, 128)), k)
        assert bool(((got[rows].double() - want[rows].double()).abs() <= tol).all())
        start += size


def test_group_tile_schedule_covers_every_row_once():
    counts = torch.tensor([0, 70, 1, 0, 130, 64])
    expert, start, end = gemm.group_tile_schedule(counts, int(counts.sum()), 64, torch.device("cpu"))
    owner = torch.full((int(counts.sum()),), -1)
    for e, s, t in zip(expert.tolist(), start.tolist(), end.tolist()):
        if e >= 0:
            assert (owner[s: min(s + 64, t)] == -1).all()
            owner[s: min(s + 64, t)] = e
    assert torch.equal(owner, torch.repeat_interleave(torch.arange(6), counts))


def test_grouped_gemm_rejects_bad_counts():
    qa, sa = fp8.quantize(torch.ones(10, 128))
    qw, sw = fp8.quantize(torch.ones(64, 128), (128, 128))
    with pytest.raises(DataError, match="counts"):
        fp8_triton.fp8_grouped_gemm(qa.to(DEVICE), sa.to(DEVICE), qw[None].to(DEVICE), sw[None].to(DEVICE),
                                    torch.tensor([9]))
