"""``moelib.load_model(path, dtype)``: a model for generation, its weights resident in fp32, bf16 or FP8."""

from __future__ import annotations

import os

import torch
from torch import nn

from moelib.convert import load_model as load_fp32
from moelib.errors import ConfigError
from moelib.model.moe import MoE
from moelib.model.transformer import Transformer

DTYPES = ("fp32", "bf16", "fp8")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype (--dtype) must be one of {', '.join(DTYPES)}, got {dtype!r}")


def router_parameters(model: nn.Module) -> set[int]:
    """ids of the routers' parameters, which stay fp32 (V3 scores and biases experts in fp32)."""
    return {id(p) for moe in model.modules() if isinstance(moe, MoE) for p in moe.gate.parameters()}


def to_bf16(model: nn.Module) -> nn.Module:
    """The model's fp32 parameters in bf16, in place, except the routers'; buffers stay fp32 (RoPE's
    frequencies in bf16 would turn late positions by whole radians)."""
    routers = router_parameters(model)
    for p in model.parameters():
        if p.dtype == torch.float32 and id(p) not in routers:
            p.data = p.data.to(torch.bfloat16)
    return model


def cast_bytes(model: Transformer, dtype: str) -> int:
    """Resident bytes of ``cast_weights(model, dtype)`` for an fp32 ``model``, from its shapes alone (a
    meta-device model will do: ``v3-671b`` costs nothing to count)."""
    from moelib.inference.fp8_weights import fp8_bytes, fp8_targets

    check_dtype(dtype)
    fp8 = {id(getattr(m, a)) for m, a in fp8_targets(model)} if dtype == "fp8" else set()
    keep = set() if dtype == "fp32" else router_parameters(model)
    total = sum(t.numel() * t.element_size() for t in model.buffers())
    for p in model.parameters():
        if id(p) in fp8:
            total += fp8_bytes(p.shape)
        else:
            total += p.numel() * (4 if dtype == "fp32" or id(p) in keep else 2)
    return total


def load_model(path: str | os.PathLike, dtype: str = "fp32") -> Transformer:
    """An eval-mode CPU model from a moelib checkpoint (step directory or root) or an HF DeepSeek-V3
    directory (the block-FP8 export included), weights in ``dtype``: "fp32", "bf16", or "fp8" (E4M3 with
    128x128 block scales for the Linears, experts and embedding; head, norms and eh_proj bf16; routers fp32).
    Each block is cast as soon as it is read, so loading never holds the whole model in fp32."""
    check_dtype(dtype)
    return load_fp32(path, cast=lambda block: cast_weights(block, dtype))


def cast_weights(model: nn.Module, dtype: str) -> nn.Module:
    """``model`` (fp32, possibly expert-sharded; the whole model or one block of it) with its weights in
    ``dtype``, in place."""
    check_dtype(dtype)
    if dtype == "fp8":  # from the fp32 weights: an FP8 export's values come back exactly
        from moelib.inference.fp8_weights import quantize_weights

        quantize_weights(model)
    return model if dtype == "fp32" else to_bf16(model)
