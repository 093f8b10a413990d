"""Triton block-scaled FP8 GEMMs: C = A·Bᵀ with DeepSeek-V3's fine-grained scales (same API as the emulation).

Each program owns a [BM, BN] tile of C and walks K in 128-wide blocks. Per block it takes one tensor-core
product of fp8 values into a fresh fp32 partial (at most 128 terms, so the tensor core's limited-precision
accumulation never runs long), then multiplies the partial by a_scale × b_scale and adds it to the fp32
accumulator: the scale product applied once per K block (N_C = 128), as in V3 and DeepGEMM.

On a GPU with fp8 tensor cores (sm89+) the fp8 tiles go to ``tl.dot`` as they are. Elsewhere (older GPUs,
the CPU interpreter) they are widened to fp16 first, which represents every E4M3/E5M2 value exactly, so
the products are the same.
"""

from __future__ import annotations

import torch

from moelib_cuda import formats, interpreting, kernel_device, prepare_triton
from moelib_cuda.formats import KernelInputError

prepare_triton()  # before triton is imported: it decides then whether to interpret

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

BLOCK_K = tl.constexpr(formats.TILE)


@triton.jit
def _scaled_tile(a_ptr, b_ptr, as_ptr, bs_ptr, rows, row_mask, cols, col_mask, K,
                 stride_am, stride_ak, stride_bn, stride_bk, stride_asm, stride_ask, stride_bsn, stride_bsk,
                 A_BM: tl.constexpr, B_BN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 FP8_MMA: tl.constexpr):
    """fp32 [BM, BN] tile of A·Bᵀ for the given rows of A and rows (``cols``) of B.

    A_BM / B_BN: rows per scale along M / N (1 for 1×128 tiles, 128 for 128×128 blocks).
    """
    ks = tl.arange(0, BLOCK_K)
    a_rows = rows.to(tl.int64)[:, None] * stride_am
    b_cols = cols.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + ks
        k_mask = k < K
        a = tl.load(a_ptr + a_rows + k[None, :] * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + b_cols + k[:, None] * stride_bk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if not FP8_MMA:
            a = a.to(tl.float16)
            b = b.to(tl.float16)
        partial = tl.dot(a, b, out_dtype=tl.float32)
        sa = tl.load(as_ptr + (rows // A_BM) * stride_asm + kb * stride_ask, mask=row_mask, other=0.0)
        sb = tl.load(bs_ptr + (cols // B_BN) * stride_bsn + kb * stride_bsk, mask=col_mask, other=0.0)
        acc += partial * (sa[:, None] * sb[None, :])
    return acc


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
                 stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                 stride_asm, stride_ask, stride_bsn, stride_bsk,
                 A_BM: tl.constexpr, B_BN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 FP8_MMA: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_mask, col_mask = rows < M, cols < N
    acc = _scaled_tile(a_ptr, b_ptr, as_ptr, bs_ptr, rows, row_mask, cols, col_mask, K,
                       stride_am, stride_ak, stride_bn, stride_bk, stride_asm, stride_ask, stride_bsn, stride_bsk,
                       A_BM, B_BN, BM, BN, FP8_MMA)
    c_offs = rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                         N, K, stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
                         stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
                         BM: tl.constexpr, BN: tl.constexpr, FP8_MMA: tl.constexpr):
    """Program (t, n): row tile t of the schedule (one expert's rows [start, end)), column tile n.

    The schedule has an upper-bound number of slots so the host never waits for the counts; unused
    slots hold expert -1 and return at once.
    """
    t = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + t)
    if expert < 0:
        return
    start = tl.load(tile_start_ptr + t)
    end = tl.load(tile_end_ptr + t)
    rows = start + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_mask, col_mask = rows < end, cols < N
    e = expert.to(tl.int64)
    acc = _scaled_tile(a_ptr, b_ptr + e * stride_be, as_ptr, bs_ptr + e * stride_bse, rows, row_mask, cols,
                       col_mask, K, stride_am, stride_ak, stride_bn, stride_bk, stride_asm, stride_ask,
                       stride_bsn, stride_bsk, 1, BLOCK_K, BM, BN, FP8_MMA)
    c_offs = rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _fp8_mma(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Feed fp8 straight to the tensor cores (sm89+, one format); otherwise widen to fp16 in-kernel."""
    return (not interpreting() and a.dtype == b.dtype
            and torch.cuda.get_device_capability(a.device) >= (8, 9))


def _out_buffer(m: int, n: int, out_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # The interpreter's fp32 → bf16/fp16 cast truncates; there the kernel writes fp32 and torch rounds.
    dtype = torch.float32 if interpreting() else out_dtype
    return torch.empty(m, n, dtype=dtype, device=device)


def fp8_gemm(a: torch.Tensor, a_scale_inv: torch.Tensor, b: torch.Tensor, b_scale_inv: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, a_block: tuple[int, int] = (1, formats.TILE),
             b_block: tuple[int, int] = (formats.TILE, formats.TILE), block_m: int = 64,
             block_n: int = 128) -> torch.Tensor:
    """Triton twin of ``moelib.precision.fp8.fp8_gemm`` (same numerics up to fp32 summation order). The
    caller checks the operands' formats and the scales' shapes (moelib.precision.fp8.check_gemm_scale)."""
    (m, k), n = a.shape, b.shape[0]
    kernel_device(a)
    c = _out_buffer(m, n, out_dtype, a.device)
    if c.numel():
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _gemm_kernel[grid](
            a, b, c, a_scale_inv, b_scale_inv, m, n, k,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            a_scale_inv.stride(0), a_scale_inv.stride(1), b_scale_inv.stride(0), b_scale_inv.stride(1),
            A_BM=a_block[0], B_BN=b_block[0], BM=block_m, BN=block_n, FP8_MMA=_fp8_mma(a, b),
        )
    return c.to(out_dtype)


def group_tile_schedule(counts: torch.Tensor, total_rows: int, block_m: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row tiles of all experts' groups, built on the device without reading counts on the host.

    Slot t belongs to the expert whose cumulative tile count first exceeds t. There are at most
    ceil(S/block_m) + E tiles (each group wastes less than one tile), so that many slots always suffice;
    the unused ones get expert -1. Returns (expert, start row, end row) per slot, int32.
    """
    counts = counts.to(device=device, dtype=torch.int64)
    num_experts = counts.numel()
    ends = torch.cumsum(counts, 0)
    tiles = (counts + block_m - 1) // block_m
    tiles_cum = torch.cumsum(tiles, 0)
    slots = torch.arange(triton.cdiv(total_rows, block_m) + num_experts, device=device)
    expert = torch.searchsorted(tiles_cum, slots, right=True)
    e = expert.clamp(max=num_experts - 1)
    first_tile = tiles_cum[e] - tiles[e]
    start = ends[e] - counts[e] + (slots - first_tile) * block_m
    expert = torch.where(expert < num_experts, expert, -1)
    return expert.int(), start.int(), ends[e].int()


def fp8_grouped_gemm(a: torch.Tensor, a_scale_inv: torch.Tensor, b: torch.Tensor, b_scale_inv: torch.Tensor,
                     counts: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, block_m: int = 64,
                     block_n: int = 128) -> torch.Tensor:
    """Triton twin of ``moelib.precision.fp8.fp8_grouped_gemm``: one launch over all experts' token groups.

    The caller checks shapes and formats (moelib.precision.fp8.check_grouped). counts on the CPU are checked
    against a's rows; counts on the GPU are trusted (checking would stall the host on the device, which the
    on-device tile schedule exists to avoid).
    """
    if counts.device.type == "cpu" and (bool((counts < 0).any()) or int(counts.sum()) != a.shape[0]):
        raise KernelInputError(f"counts {counts.tolist()} must be non-negative and sum to a's {a.shape[0]} rows.")
    kernel_device(a)
    (s, k), n = a.shape, b.shape[1]
    c = _out_buffer(s, n, out_dtype, a.device)
    if c.numel():
        expert, start, end = group_tile_schedule(counts, s, block_m, a.device)
        grid = (expert.numel(), triton.cdiv(n, block_n))
        _grouped_gemm_kernel[grid](
            a, b, c, a_scale_inv, b_scale_inv, expert, start, end, n, k,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
            a_scale_inv.stride(0), a_scale_inv.stride(1),
            b_scale_inv.stride(0), b_scale_inv.stride(1), b_scale_inv.stride(2),
            BM=block_m, BN=block_n, FP8_MMA=_fp8_mma(a, b),
        )
    return c.to(out_dtype)
