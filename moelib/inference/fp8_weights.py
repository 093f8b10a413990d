"""FP8-resident weights for inference: every precision-layer Linear (kv_b_proj included), the routed and
shared experts and the token embedding keep their weights as E4M3 with one fp32 scale per 128x128 block
(DeepSeek-V3's released format), half of bf16's bytes.

GEMMs go through ``ResidentFp8Backend``: the weight is dequantised block by block to bf16 when it is used
(only the experts that got tokens) and multiplied in bf16. The absorbed MLA path dequantises kv_b_proj
itself (``MLA.absorbed_weights``), as DeepSeek's inference model does with wkv_b. The embedding in FP8 is
our inference-memory choice, not V3's (its release keeps embedding and head bf16): a lookup dequantises
only the rows it reads (``moelib.model.embedding``). The head, norms, routers and MTP's eh_proj stay as
they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
               name: str = "linear", input_again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), dequantized(weight, weight.scale_inv))

    def grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, *,
                       pow2_input: bool = False, name: str = "experts",
                       input_again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
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


def fp8_targets(model: nn.Module, embedding: bool = True) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every weight ``quantize_weights`` turns into FP8."""
    targets = []
    for module in model.modules():
        if isinstance(module, Linear):
            targets.append((module, "weight"))
        elif isinstance(module, GroupedExperts):
            targets += [(module, "gate_up_proj"), (module, "down_proj")]
        elif isinstance(module, nn.Embedding) and embedding:
            targets.append((module, "weight"))
    return targets


def fp8_bytes(shape: torch.Size) -> int:
    """Bytes of an E4M3 weight of ``shape`` ([out, in] or stacked [E, out, in]) with its fp32 block scales."""
    *stack, rows, cols = shape
    blocks = math.prod(stack) * math.ceil(rows / BLOCK[0]) * math.ceil(cols / BLOCK[1])
    return math.prod(shape) + 4 * blocks


def quantize_weights(model: nn.Module, embedding: bool = True) -> nn.Module:
    """Make ``model`` keep its Linear and expert weights (and, with ``embedding``, its embedding table) in
    FP8, in place, quantised from their values (fp32 or bf16); the rest is left as it is."""
    backend = ResidentFp8Backend()
    for module, attr in fp8_targets(model, embedding):
        setattr(module, attr, fp8_parameter(getattr(module, attr)))
        if hasattr(module, "backend"):
            module.backend = backend
    return model


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, FP8 block scales included."""
    tensors = [*model.parameters(), *model.buffers()]
    scales = [t.scale_inv for t in model.parameters() if hasattr(t, "scale_inv")]
    return sum(t.numel() * t.element_size() for t in tensors + scales)
