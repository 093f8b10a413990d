"""FP8-resident weights for inference: every precision-layer Linear and routed/shared expert keeps its weight
as E4M3 with one fp32 scale per 128x128 block (DeepSeek-V3's released format), half of bf16's bytes.

Their GEMMs go through ``ResidentFp8Backend``: the weight is dequantised block by block to bf16 when it is
used (only the experts that got tokens) and multiplied in bf16. kv_b_proj stays bf16: the absorbed MLA
path uses its weight directly as per-head matrices, not as a GEMM through the backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelib.config import PrecisionConfig
from moelib.model.moe import GroupedExperts
from moelib.precision.backends import Backend, Linear
from moelib.precision.fp8 import dequantize, quantize

BLOCK = (128, 128)


def fp8_parameter(weight: torch.Tensor) -> nn.Parameter:
    """A frozen E4M3 copy of a [out, in] (or stacked [E, out, in]) weight; its block scales ride along as
    the attribute ``scale_inv`` ([out/128, in/128], or [E, ...])."""
    mats = weight.detach().float().reshape(-1, *weight.shape[-2:])
    pairs = [quantize(m, BLOCK, name="weight") for m in mats]
    data = torch.stack([d for d, _ in pairs]).reshape(weight.shape)
    scale = torch.stack([s for _, s in pairs]).reshape(*weight.shape[:-2], *pairs[0][1].shape)
    param = nn.Parameter(data, requires_grad=False)
    param.scale_inv = scale
    return param


def dequantized(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    return dequantize(weight, scale_inv, BLOCK, torch.bfloat16)


class ResidentFp8Backend(Backend):
    """bf16 GEMMs on weights dequantised from their resident E4M3 blocks at each use."""

    def __init__(self):
        super().__init__(PrecisionConfig(backend="bf16"))
        self.name = "fp8-weights"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, *, pow2_input: bool = False,
               name: str = "linear") -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), dequantized(weight, weight.scale_inv))

    def grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, *,
                       pow2_input: bool = False, name: str = "experts") -> torch.Tensor:
        out = x.new_empty(x.shape[0], weight.shape[1], dtype=torch.bfloat16)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:  # experts that got no rows are never dequantised
                out[start:start + n] = F.linear(x[start:start + n].to(torch.bfloat16),
                                                dequantized(weight[e], weight.scale_inv[e]))
            start += n
        return out

    def expert_row_multiple(self, x: torch.Tensor) -> int:
        return 1  # a GEMM per expert here: no shared row layout to pad to


def quantize_weights(model: nn.Module) -> nn.Module:
    """Make ``model`` keep its Linear and expert weights in FP8, in place (quantised from their values,
    fp32 or bf16; the rest is left as it is)."""
    backend = ResidentFp8Backend()
    for name, module in model.named_modules():
        if isinstance(module, Linear) and not name.endswith("kv_b_proj"):
            module.weight = fp8_parameter(module.weight)
            module.backend = backend
        elif isinstance(module, GroupedExperts):
            module.gate_up_proj = fp8_parameter(module.gate_up_proj)
            module.down_proj = fp8_parameter(module.down_proj)
            module.backend = backend
    return model


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, FP8 block scales included."""
    tensors = [*model.parameters(), *model.buffers()]
    scales = [t.scale_inv for t in model.parameters() if hasattr(t, "scale_inv")]
    return sum(t.numel() * t.element_size() for t in tensors + scales)
