"""moelib_cuda's Triton kernels behind moelib's checks: the ``fp8-triton`` backend's five functions.

moelib_cuda imports nothing of moelib (it sits below every moelib layer), so its kernels take inputs whose
shapes and formats the caller has checked and raise their own KernelInputError for what only they see
(a tensor on the wrong device, non-finite values, counts that do not add up). Here the emulated core's
checks (moelib.precision.fp8) run first and the kernels' errors become moelib's DataError, so both FP8
backends reject bad input with the same errors. Importing this module imports triton.
"""

from __future__ import annotations

import contextlib

import torch

from moelib.errors import DataError
from moelib.precision import fp8
from moelib_cuda import gemm, quant
from moelib_cuda.formats import KernelInputError

TILE = fp8.TILE


@contextlib.contextmanager
def _as_data_error():
    try:
        yield
    except KernelInputError as exc:
        raise DataError(str(exc)) from None


def quantize(x: torch.Tensor, block: tuple[int, int] = (1, TILE), fmt: str = "e4m3", pow2_scale: bool = False,
             name: str = "input") -> tuple[torch.Tensor, torch.Tensor]:
    block = fp8.check_block(block)
    fp8.fp8_format(fmt)
    fp8.check_input(x, name, check_finite=False)  # the kernel finds non-finite values itself
    with _as_data_error():
        return quant.quantize(x, block, fmt, pow2_scale, name)


def quantize_transposed(x: torch.Tensor, fmt: str = "e4m3", pow2_scale: bool = False,
                        name: str = "input") -> tuple[torch.Tensor, torch.Tensor]:
    fp8.fp8_format(fmt)
    fp8.check_input(x, name, check_finite=False)
    with _as_data_error():
        return quant.quantize_transposed(x, fmt, pow2_scale, name)


def requantize_transposed(data: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (1, TILE),
                          fmt: str | None = None, pow2_scale: bool = False,
                          name: str = "input") -> tuple[torch.Tensor, torch.Tensor]:
    block = fp8.check_quantized(data, scale_inv, block)
    fp8.fp8_format(fmt or fp8.format_of(data.dtype))
    with _as_data_error():
        return quant.requantize_transposed(data, scale_inv, block, fmt, pow2_scale, name)


def fp8_gemm(a: torch.Tensor, a_scale_inv: torch.Tensor, b: torch.Tensor, b_scale_inv: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, a_block: tuple[int, int] = (1, TILE),
             b_block: tuple[int, int] = (TILE, TILE)) -> torch.Tensor:
    fp8.check_gemm(a, b)
    a_block = fp8.check_gemm_scale(a_scale_inv, a_block, a.shape[0], a.shape[1], "a_scale_inv")
    b_block = fp8.check_gemm_scale(b_scale_inv, b_block, b.shape[0], b.shape[1], "b_scale_inv")
    with _as_data_error():
        return gemm.fp8_gemm(a, a_scale_inv, b, b_scale_inv, out_dtype, a_block, b_block)


def fp8_grouped_gemm(a: torch.Tensor, a_scale_inv: torch.Tensor, b: torch.Tensor, b_scale_inv: torch.Tensor,
                     counts: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    fp8.check_grouped(a, a_scale_inv, b, b_scale_inv, counts)
    with _as_data_error():
        return gemm.fp8_grouped_gemm(a, a_scale_inv, b, b_scale_inv, counts, out_dtype)
