"""Triton tile/block FP8 quantisation, bit-identical to ``moelib.precision.fp8`` (same signatures).

One kernel does all three jobs: it reads a 2-D source through strides, so a transposed source is just
swapped strides (``quantize_transposed``), and it can first dequantise an fp8 source with that source's
own scales (``requantize_transposed``, the backward's re-tiling of the cached FP8 input).

The fp32 → fp8 cast is done on the bits, not with ``.to(tl.float8e4nv)``: Triton 3.9's CPU interpreter
truncates instead of rounding, ignores saturation and gets mantissa carries wrong, so it cannot match
torch. The bit routine is round-to-nearest-even, was checked against torch's cast for every finite fp32
in [-fmax, fmax] (both formats), and costs a few integer ops on a GPU, where a memory-bound kernel does
not notice them. Divisions use ``div_rn`` so a GPU rounds them exactly as torch does.
"""

from __future__ import annotations

import torch

from moelib_cuda import formats, kernel_device, prepare_triton
from moelib_cuda.formats import KernelInputError

prepare_triton()  # before triton is imported: it decides then whether to interpret

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_MIN_SCALE = tl.constexpr(formats.MIN_SCALE)
_TILE_ROWS = 64  # tile length along an axis whose block size is 1 (more rows per program, fewer programs)


@triton.jit
def _scale_inv(amax, FMAX: tl.constexpr, POW2: tl.constexpr):
    """amax/fmax, floored at 2^-126, 1 for all-zero tiles, optionally rounded up to a power of two."""
    s = tl.maximum(tl.math.div_rn(amax, FMAX), _MIN_SCALE)
    s = tl.where(amax == 0.0, 1.0, s)
    if POW2:
        # s is a normal fp32: a non-zero mantissa bumps the exponent by one and clears the mantissa.
        bits = s.to(tl.int32, bitcast=True)
        bits = tl.where((bits & 0x7FFFFF) != 0, (bits & 0x7F800000) + 0x800000, bits)
        s = bits.to(tl.float32, bitcast=True)
    return s


@triton.jit
def _fp8_bits(y, MANT: tl.constexpr, BIAS: tl.constexpr, SUB_MAGIC: tl.constexpr):
    """fp32 → fp8 bit pattern, round to nearest even, for finite |y| ≤ fmax (F. Giesen's float→half method)."""
    DROP: tl.constexpr = 23 - MANT
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80  # arithmetic shift: bit 31 lands on bit 7
    a = bits & 0x7FFFFFFF
    # fp8 normals: drop DROP mantissa bits, rounding by adding just under half an ulp plus the lowest kept
    # bit (ties go to even); a carry into the exponent is the right round-up. Then rebias the exponent.
    normal = ((a + ((1 << (DROP - 1)) - 1) + ((a >> DROP) & 1)) >> DROP) - ((127 - BIAS) << MANT)
    # Below fp8's smallest normal the grid is uniform. Adding SUB_MAGIC (a power of two whose fp32 ulp is
    # that grid's spacing) makes the fp32 adder round to it; the low bits are then the fp8 code.
    magic_bits = tl.full(y.shape, SUB_MAGIC, tl.float32).to(tl.int32, bitcast=True)
    subnormal = (tl.abs(y) + SUB_MAGIC).to(tl.int32, bitcast=True) - magic_bits
    code = tl.where(a < ((128 - BIAS) << 23), subnormal, normal)
    return (code | sign).to(tl.uint8)


@triton.jit
def _quantize_kernel(
    x_ptr, xs_ptr, y_ptr, s_ptr, R, C,
    stride_xr, stride_xc, stride_xsr, stride_xsc, stride_yr, stride_yc, stride_sr, stride_sc,
    B0: tl.constexpr, B1: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
    DEQUANT: tl.constexpr, XS_B0: tl.constexpr, XS_B1: tl.constexpr,
    FMAX: tl.constexpr, MANT: tl.constexpr, BIAS: tl.constexpr, SUB_MAGIC: tl.constexpr, POW2: tl.constexpr,
):
    """Quantise one [TR, TC] tile of y = x (read through strides) in B0×B1 blocks.

    An axis whose block is 128 has tile length 128 and is reduced for amax; an axis whose block is 1 is
    not reduced, so the program writes (TR/B0)×(TC/B1) scales. With DEQUANT, x is fp8 and is first
    multiplied by its own scales (blocks XS_B0×XS_B1 in y's coordinates).
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * TR + tl.arange(0, TR)
    cols = pid_c * TC + tl.arange(0, TC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    r64, c64 = rows.to(tl.int64)[:, None], cols.to(tl.int64)[None, :]  # offsets may pass 2^31 elements
    x = tl.load(x_ptr + r64 * stride_xr + c64 * stride_xc, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if DEQUANT:
        xs_offs = (rows // XS_B0)[:, None] * stride_xsr + (cols // XS_B1)[None, :] * stride_xsc
        x = x * tl.load(xs_ptr + xs_offs, mask=mask, other=0.0)

    # amax per block, plus a non-finite flag: GPU max ignores NaN, so NaN/Inf is flagged separately and
    # turned into a NaN scale, which the wrapper reports (no extra pass over x).
    amax = tl.abs(x)
    nonfinite = tl.where(amax < float("inf"), 0, 1)
    if B1 > 1:
        amax = tl.max(amax, axis=1, keep_dims=True)
        nonfinite = tl.max(nonfinite, axis=1, keep_dims=True)
    if B0 > 1:
        amax = tl.max(amax, axis=0, keep_dims=True)
        nonfinite = tl.max(nonfinite, axis=0, keep_dims=True)
    s = _scale_inv(amax, FMAX, POW2)
    s = tl.where(nonfinite > 0, float("nan"), s)

    y = tl.math.div_rn(x, s)
    y = tl.minimum(tl.maximum(y, -FMAX), FMAX)
    tl.store(y_ptr + r64 * stride_yr + c64 * stride_yc, _fp8_bits(y, MANT, BIAS, SUB_MAGIC), mask=mask)

    s_rows = pid_r * (TR // B0) + tl.arange(0, TR // B0)
    s_cols = pid_c * (TC // B1) + tl.arange(0, TC // B1)
    s_mask = (s_rows[:, None] * B0 < R) & (s_cols[None, :] * B1 < C)
    tl.store(s_ptr + s_rows[:, None] * stride_sr + s_cols[None, :] * stride_sc, s, mask=s_mask)


def _launch(x: torch.Tensor, strides: tuple[int, int], shape: tuple[int, int], block: tuple[int, int],
            fmt: str, pow2_scale: bool, name: str, x_scale: torch.Tensor | None = None,
            x_scale_strides: tuple[int, int] = (0, 0), x_scale_block: tuple[int, int] = (1, 1),
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise y (shape ``shape``, y[r, c] = x[r·strides[0] + c·strides[1]]) in ``block`` tiles."""
    f = formats.fp8_format(fmt)
    kernel_device(x)
    rows, cols = shape
    data = torch.empty(rows, cols, dtype=f.dtype, device=x.device)
    scale_inv = torch.empty(formats.scale_grid(shape, block), dtype=torch.float32, device=x.device)
    if data.numel() == 0:
        return data, scale_inv
    tile_r = block[0] if block[0] > 1 else _TILE_ROWS
    tile_c = block[1] if block[1] > 1 else _TILE_ROWS
    grid = (triton.cdiv(rows, tile_r), triton.cdiv(cols, tile_c))
    sub_magic = 2.0 ** (23 - f.mantissa_bits + 1 - f.exponent_bias)
    _quantize_kernel[grid](
        x, x if x_scale is None else x_scale, data.view(torch.uint8), scale_inv, rows, cols,
        strides[0], strides[1], x_scale_strides[0], x_scale_strides[1],
        data.stride(0), data.stride(1), scale_inv.stride(0), scale_inv.stride(1),
        B0=block[0], B1=block[1], TR=tile_r, TC=tile_c,
        DEQUANT=x_scale is not None, XS_B0=x_scale_block[0], XS_B1=x_scale_block[1],
        FMAX=f.fmax, MANT=f.mantissa_bits, BIAS=f.exponent_bias, SUB_MAGIC=sub_magic, POW2=pow2_scale,
    )
    if not bool(torch.isfinite(scale_inv).all()):
        raise KernelInputError(f"{name} has non-finite values (NaN/Inf), which FP8 quantisation cannot represent.")
    return data, scale_inv


def quantize(x: torch.Tensor, block: tuple[int, int] = (1, formats.TILE), fmt: str = "e4m3", pow2_scale: bool = False,
             name: str = "input") -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``moelib.precision.fp8.quantize``: same ``(data, scale_inv)``, bit for bit. x is 2-D
    float32, bfloat16 or float16 (the caller checks); non-finite values raise KernelInputError naming it."""
    block = formats.check_block(block)
    return _launch(x, (x.stride(0), x.stride(1)), tuple(x.shape), block, fmt, pow2_scale, name)


def quantize_transposed(x: torch.Tensor, fmt: str = "e4m3", pow2_scale: bool = False,
                        name: str = "input") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x.T in 1×128 tiles in one pass (a fused cast + transpose); see the emulated twin."""
    shape = (x.shape[1], x.shape[0])
    return _launch(x, (x.stride(1), x.stride(0)), shape, (1, formats.TILE), fmt, pow2_scale, name)


def requantize_transposed(data: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (1, formats.TILE),
                          fmt: str | None = None, pow2_scale: bool = False,
                          name: str = "input") -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantise fp8 ``data`` (2-D, with scale_inv in ``block`` tiles: the caller checks the shapes) and
    quantise its transpose in 1×128 tiles, in one pass."""
    block = formats.check_block(block)
    fmt = fmt or formats.format_of(data.dtype)
    # In y = dataᵀ coordinates, the source's (b0, b1) blocks are (b1, b0) and its scale strides swap too.
    xs = scale_inv.float()
    return _launch(data, (data.stride(1), data.stride(0)), (data.shape[1], data.shape[0]), (1, formats.TILE), fmt,
                   pow2_scale, name, x_scale=xs, x_scale_strides=(xs.stride(1), xs.stride(0)),
                   x_scale_block=(block[1], block[0]))
