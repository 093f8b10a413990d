"""Fine-grained FP8 quantisation and block-scaled GEMMs in pure PyTorch (DeepSeek-V3's recipe, REFERENCE §4).

This is the reference ("emulated") numerics: it runs anywhere, and the Triton kernels in ``moelib_cuda``
reproduce its ``data`` and ``scale_inv`` bit for bit.

Conventions (as the released V3 checkpoints):

* ``quantize`` returns ``(data, scale_inv)``: ``data`` is fp8 with x's shape, ``scale_inv`` is fp32 with one
  entry per tile/block, ``[ceil(rows/b0), ceil(cols/b1)]``, and x ≈ data × scale_inv blockwise.
* ``scale_inv = amax / fmax`` of the tile (fmax = 448 for E4M3), so the tile's largest element maps to ±448.
  Edge tiles use their own amax.
* An all-zero tile gets ``scale_inv = 1`` (Transformer Engine's choice for amax = 0): its data is zero
  whatever the scale, and 1 keeps it finite and a power of two. DeepSeek's kernel instead floors amax at
  1e-4, which would flush every tile whose amax is below 1e-4 (small gradients) to zero; we do not.
* A non-zero tile whose amax/fmax would be below the smallest normal fp32 (amax < ~5e-36) gets
  ``scale_inv = 2^-126``, so the scale is never zero or subnormal (no division blow-ups, nothing a
  flush-to-zero GPU would treat differently). Such tiles lose relative precision, never finiteness.
* ``pow2_scale`` rounds scale_inv UP to a power of two ("ue8m0", 2^ceil(log2 s)); this is the same as
  Transformer Engine's Float8BlockScaling, which rounds 448/amax down to a power of two.
* Quantisation is ``(x / scale_inv).clamp(-fmax, fmax)`` cast to fp8 with round-to-nearest-even, all in fp32.
"""

from __future__ import annotations

import torch

from moelib.errors import ConfigError, DataError
from moelib_cuda import formats as _kernel_formats
from moelib_cuda.formats import (
    BLOCKS,
    FORMATS,  # noqa: F401  (part of this module's API: fp8.FORMATS)
    MIN_SCALE,
    TILE,
    Fp8Format,
    KernelInputError,
    scale_grid,
)

# TILE (N_C in the V3 paper: the K-block over which one scale product applies), the 1×128 / 128×1 / 128×128
# BLOCKS, MIN_SCALE (the smallest normal fp32, the floor of a non-zero tile's scale_inv) and the FORMATS
# are the kernels' (moelib_cuda.formats), so the reference and the kernels cannot disagree on them.
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fp8_format(fmt: str) -> Fp8Format:
    try:
        return _kernel_formats.fp8_format(fmt)
    except KernelInputError as exc:
        raise ConfigError(str(exc)) from None


def format_of(dtype: torch.dtype) -> str:
    try:
        return _kernel_formats.format_of(dtype)
    except KernelInputError as exc:
        raise DataError(str(exc)) from None


def check_block(block: tuple[int, int], allowed: tuple[tuple[int, int], ...] = BLOCKS) -> tuple[int, int]:
    block = tuple(block)
    if block not in allowed:
        raise ConfigError(f"block {block} is not supported; use one of {list(allowed)}.")
    return block


def check_input(x: torch.Tensor, name: str, check_finite: bool = True) -> None:
    """Shape, dtype and finiteness checks (the Triton quantiser checks finiteness inside the kernel)."""
    if x.dim() != 2:
        raise DataError(f"{name} must be 2-D to quantise (flatten leading dims), got shape {tuple(x.shape)}.")
    if x.dtype not in INPUT_DTYPES:
        raise DataError(f"{name} has dtype {x.dtype}; quantisation takes float32, bfloat16 or float16.")
    if check_finite and x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise DataError(f"{name} has {bad} non-finite values (NaN/Inf), which FP8 quantisation cannot represent.")


def _tiled(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Zero-pad x to whole blocks and view it as [row_blocks, b0, col_blocks, b1]."""
    rows, cols = scale_grid(x.shape, block)
    pad_r, pad_c = rows * block[0] - x.shape[0], cols * block[1] - x.shape[1]
    if pad_r or pad_c:
        x = torch.nn.functional.pad(x, (0, pad_c, 0, pad_r))
    return x.reshape(rows, block[0], cols, block[1])


def scale_from_amax(amax: torch.Tensor, fmax: float, pow2_scale: bool) -> torch.Tensor:
    """scale_inv = amax/fmax; 1 for all-zero tiles; floored at 2^-126; optionally rounded up to 2^n."""
    s = torch.clamp(amax / fmax, min=MIN_SCALE)
    s = torch.where(amax == 0, torch.ones_like(s), s)
    if pow2_scale:
        # s is a normal fp32 here, so 2^ceil(log2 s) is exact on the bits: a non-zero mantissa bumps the
        # exponent by one and clears the mantissa.
        bits = s.view(torch.int32)
        up = (bits & 0x7F800000) + 0x00800000
        s = torch.where((bits & 0x007FFFFF) != 0, up, bits).view(torch.float32)
    return s


def quantize(x: torch.Tensor, block: tuple[int, int] = (1, TILE), fmt: str = "e4m3", pow2_scale: bool = False,
             name: str = "input") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D tensor to fp8 with one scale per ``block`` tile; returns ``(data, scale_inv)``.

    ``name`` is the tensor's name in error messages (NaN/Inf input raises DataError naming it).
    """
    f = fp8_format(fmt)
    block = check_block(block)
    check_input(x, name)
    tiles = _tiled(x.float(), block)
    amax = tiles.abs().amax(dim=(1, 3))
    scale_inv = scale_from_amax(amax, f.fmax, pow2_scale)
    y = (tiles / scale_inv[:, None, :, None]).clamp(-f.fmax, f.fmax)
    rows, cols = tiles.shape[0] * block[0], tiles.shape[2] * block[1]
    data = y.reshape(rows, cols)[: x.shape[0], : x.shape[1]].to(f.dtype)
    return data.contiguous(), scale_inv


def _check_scale_shape(scale_inv: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> None:
    if tuple(scale_inv.shape) != scale_grid(shape, block):
        raise DataError(f"scale_inv has shape {tuple(scale_inv.shape)}, but data of shape {tuple(shape)} in "
                        f"{tuple(block)} blocks needs {scale_grid(shape, block)}.")


def expand_scale(scale_inv: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Per-element scale of a [rows, cols] tensor from its per-block scale_inv."""
    _check_scale_shape(scale_inv, block, shape)
    s = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return s[: shape[0], : shape[1]]


def check_quantized(data: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> tuple[int, int]:
    """fp8 ``data`` must be 2-D in a known format, with one scale_inv entry per ``block`` tile; returns the block."""
    block = check_block(block)
    format_of(data.dtype)
    if data.dim() != 2:
        raise DataError(f"fp8 data must be 2-D, got shape {tuple(data.shape)}.")
    _check_scale_shape(scale_inv, block, data.shape)
    return block


def dequantize(data: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (1, TILE),
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """data × scale_inv blockwise, computed in fp32 and returned as ``out_dtype``."""
    block = check_quantized(data, scale_inv, block)
    return (data.float() * expand_scale(scale_inv, block, data.shape)).to(out_dtype)


def quantize_transposed(x: torch.Tensor, fmt: str = "e4m3", pow2_scale: bool = False,
                        name: str = "input") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x.T in 1×128 tiles, i.e. tiles running along x's rows (the token dimension).

    The weight-grad GEMM dW = dYᵀ·X contracts over tokens, so both of its operands need their tiles along
    tokens, while the forward and input-grad GEMMs tile along features. Returns data of shape [cols, rows].
    """
    if x.dim() != 2:
        raise DataError(f"{name} must be 2-D to quantise (flatten leading dims), got shape {tuple(x.shape)}.")
    return quantize(x.t(), (1, TILE), fmt, pow2_scale, name)


def requantize_transposed(data: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (1, TILE),
                          fmt: str | None = None, pow2_scale: bool = False,
                          name: str = "input") -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantise fp8 ``data`` and quantise its transpose in 1×128 tiles.

    This is what the backward does with the FP8-cached input of a Linear: it was tiled along features for
    the forward, and the weight-grad GEMM needs it tiled along tokens. The double rounding costs accuracy
    (V3 names a fused transposing cast as a hardware wish for this reason); ``fmt`` defaults to data's own.
    """
    fmt = fmt or format_of(data.dtype)
    return quantize(dequantize(data, scale_inv, block).t(), (1, TILE), fmt, pow2_scale, name)


GEMM_BLOCKS = ((1, TILE), (TILE, TILE))  # a scale must be constant along a K block


def check_gemm_scale(scale_inv: torch.Tensor, block: tuple[int, int], rows: int, k: int,
                     what: str) -> tuple[int, int]:
    """Validate a GEMM operand's block shape and scale_inv shape; returns the block."""
    block = check_block(block, GEMM_BLOCKS)
    want = scale_grid((rows, k), block)
    if tuple(scale_inv.shape) != want:
        raise DataError(f"{what} has shape {tuple(scale_inv.shape)}; {block} blocks of a [{rows}, {k}] operand "
                        f"need {want}.")
    if scale_inv.dtype != torch.float32:
        raise DataError(f"{what} must be float32, got {scale_inv.dtype}.")
    return block


def _row_scales(scale_inv: torch.Tensor, block: tuple[int, int], rows: int, k: int, what: str) -> torch.Tensor:
    """[rows, k_blocks] per-row view of a GEMM operand's scales (128×128 blocks repeat over 128 rows)."""
    block = check_gemm_scale(scale_inv, block, rows, k, what)
    return scale_inv.repeat_interleave(block[0], 0)[:rows]


def check_gemm(a: torch.Tensor, b: torch.Tensor) -> None:
    for t, what in ((a, "a"), (b, "b")):
        format_of(t.dtype)
        if t.dim() != 2:
            raise DataError(f"fp8_gemm operand {what} must be 2-D, got shape {tuple(t.shape)}.")
    if a.shape[1] != b.shape[1]:
        raise DataError(f"fp8_gemm computes a·bᵀ, so a {tuple(a.shape)} and b {tuple(b.shape)} must share K.")


def fp8_gemm(a: torch.Tensor, a_scale_inv: torch.Tensor, b: torch.Tensor, b_scale_inv: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, a_block: tuple[int, int] = (1, TILE),
             b_block: tuple[int, int] = (TILE, TILE)) -> torch.Tensor:
    """C = A·Bᵀ for fp8 A [M, K] and B [N, K], accumulating in fp32 as DeepSeek-V3 / DeepGEMM do.

    Per 128-wide K block, the fp8 values are multiplied and summed in fp32 (products of two fp8 values are
    exact in fp32), and the partial sum is then scaled by a_scale × b_scale and added to an fp32
    accumulator: the scale product is applied once per K block, so no low-precision accumulator ever
    sums more than 128 terms. B may be in 128×128 blocks (weights) or 1×128 tiles (weight-grad GEMM);
    A in 1×128 tiles (or 128×128 blocks). B may be a transposed view (dgrad uses Wᵀ, whose 128×128
    blocks are W's blocks transposed: pass ``w_data.t(), w_scale_inv.t()``).
    """
    check_gemm(a, b)
    (m, k), n = a.shape, b.shape[0]
    kb = -(-k // TILE)
    sa = _row_scales(a_scale_inv, a_block, m, k, "a_scale_inv")
    sb = _row_scales(b_scale_inv, b_block, n, k, "b_scale_inv")
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    # One batched matmul per chunk of K blocks (chunks bound the [chunk, M, N] fp32 partials to 256 MB);
    # the partials are then scaled and folded in K order, as the kernel's accumulator does. fp8 values
    # are exact in fp32 and TF32 alike, so a GPU allowing TF32 matmuls computes the same partials.
    chunk = max(1, min(kb, (1 << 26) // max(1, m * n)))
    for k0 in range(0, kb, chunk):
        k1 = min(kb, k0 + chunk)
        partial = torch.bmm(_k_blocks(a, k0, k1), _k_blocks(b, k0, k1).transpose(1, 2))
        for j, p in enumerate(partial):
            acc += p * (sa[:, k0 + j, None] * sb[None, :, k0 + j])
    return acc.to(out_dtype)


def _k_blocks(t: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """K blocks k0..k1 of an fp8 [R, K] operand as fp32 [k1-k0, R, 128], zero-padded past K."""
    part = t[:, k0 * TILE: k1 * TILE].float()
    pad = (k1 - k0) * TILE - part.shape[1]
    if pad:
        part = torch.nn.functional.pad(part, (0, pad))
    return part.reshape(t.shape[0], k1 - k0, TILE).transpose(0, 1)


def check_grouped(a: torch.Tensor, a_scale_inv: torch.Tensor, b: torch.Tensor, b_scale_inv: torch.Tensor,
                  counts: torch.Tensor) -> None:
    format_of(a.dtype)
    format_of(b.dtype)
    if a.dim() != 2 or b.dim() != 3 or a.shape[1] != b.shape[2]:
        raise DataError(f"fp8_grouped_gemm needs a [S, K] and b [E, N, K]; got {tuple(a.shape)} and "
                        f"{tuple(b.shape)}.")
    e, n, k = b.shape
    if counts.dim() != 1 or counts.numel() != e:
        raise DataError(f"counts must hold one row count per expert ({e}), got shape {tuple(counts.shape)}.")
    check_gemm_scale(a_scale_inv, (1, TILE), a.shape[0], k, "a_scale_inv")
    if tuple(b_scale_inv.shape) != (e, -(-n // TILE), -(-k // TILE)):
        raise DataError(f"b_scale_inv has shape {tuple(b_scale_inv.shape)}; 128×128 blocks of b need "
                        f"{(e, -(-n // TILE), -(-k // TILE))}.")


def fp8_grouped_gemm(a: torch.Tensor, a_scale_inv: torch.Tensor, b: torch.Tensor, b_scale_inv: torch.Tensor,
                     counts: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Routed experts: out[rows of expert e] = A[rows of e]·B[e]ᵀ with the numerics of ``fp8_gemm``.

    a: [S, K] fp8 in 1×128 tiles, rows sorted by expert; b: [E, N, K] fp8 in 128×128 blocks with
    b_scale_inv [E, ceil(N/128), ceil(K/128)]; counts: [E] rows per expert, summing to S.
    The emulation loops over experts (never over tokens); the Triton kernel does one launch.
    """
    check_grouped(a, a_scale_inv, b, b_scale_inv, counts)
    sizes = [int(c) for c in counts.tolist()]
    if min(sizes, default=0) < 0 or sum(sizes) != a.shape[0]:
        raise DataError(f"counts {sizes} must be non-negative and sum to a's {a.shape[0]} rows.")
    out = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    start = 0
    for e, size in enumerate(sizes):
        if size:
            rows = slice(start, start + size)
            out[rows] = fp8_gemm(a[rows], a_scale_inv[rows], b[e], b_scale_inv[e], out_dtype)
        start += size
    return out
