"""The FP8 encodings and tile sizes the kernels implement (DeepSeek-V3's fine-grained recipe).

moelib_cuda imports nothing of moelib, so they are stated here, and moelib.precision.fp8's pure-PyTorch
reference takes them from here. Importing this module imports neither triton nor moelib.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TILE = 128  # the K-block over which one scale product applies
BLOCKS = ((1, TILE), (TILE, 1), (TILE, TILE))
MIN_SCALE = 2.0**-126  # smallest normal fp32: the floor of a non-zero tile's scale_inv


class KernelInputError(ValueError):
    """An input the kernels cannot take (wrong device, unknown format or block, non-finite values)."""


@dataclass(frozen=True)
class Fp8Format:
    """An fp8 encoding: torch dtype, largest finite value, mantissa bits and exponent bias."""

    dtype: torch.dtype
    fmax: float
    mantissa_bits: int
    exponent_bias: int


FORMATS = {
    "e4m3": Fp8Format(torch.float8_e4m3fn, 448.0, 3, 7),
    "e5m2": Fp8Format(torch.float8_e5m2, 57344.0, 2, 15),
}


def fp8_format(fmt: str) -> Fp8Format:
    if fmt not in FORMATS:
        raise KernelInputError(f"fp8 format {fmt!r} is not supported; use one of {sorted(FORMATS)}.")
    return FORMATS[fmt]


def format_of(dtype: torch.dtype) -> str:
    for name, f in FORMATS.items():
        if f.dtype == dtype:
            return name
    raise KernelInputError(f"fp8 data has dtype {dtype}; expected one of {[f.dtype for f in FORMATS.values()]}.")


def check_block(block: tuple[int, int]) -> tuple[int, int]:
    block = tuple(block)
    if block not in BLOCKS:
        raise KernelInputError(f"block {block} is not supported; use one of {list(BLOCKS)}.")
    return block


def scale_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of scale_inv for a tensor of ``shape`` in ``block`` tiles (edge tiles count)."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])
