"""NVIDIA Apex's fused RMSNorm, picked up when Apex is importable and the input is on a GPU; never required.

Apex's mixed-dtype kernel keeps the statistics in fp32 and returns the weight's dtype, as moelib's RMSNorm
does; it only skips rounding the normalised input to the input's dtype before the weight multiply, a
difference below that dtype's rounding. Apex's FusedAdam is not used: torch's fused AdamW is already one
kernel on CUDA, and moelib's AdamW rounds bf16 moments at a point FusedAdam does not. ``MOELIB_APEX=0`` turns
the pickup off (to compare against the pure-PyTorch path).
"""

from __future__ import annotations

import importlib.util
import os

import torch

try:
    # Apex imports without its compiled extension and fails only at the first call; check for it up front.
    if importlib.util.find_spec("fused_layer_norm_cuda") is None:
        raise ImportError("Apex's fused_layer_norm_cuda extension is not built")
    from apex.normalization.fused_layer_norm import FusedRMSNormAffineMixedDtypesFunction
except ImportError:
    FusedRMSNormAffineMixedDtypesFunction = None

ENABLED = os.environ.get("MOELIB_APEX", "1") != "0"


def status() -> str:
    """One line for start-up logs: whether Apex's RMSNorm will run on GPU tensors, and if not why."""
    if FusedRMSNormAffineMixedDtypesFunction is None:
        return "Apex fused RMSNorm: not importable (pure-PyTorch RMSNorm)"
    return "Apex fused RMSNorm: on for GPU tensors" if ENABLED else "Apex fused RMSNorm: off (MOELIB_APEX=0)"


def on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


def applies(x: torch.Tensor) -> bool:
    """Whether ``fused_rms_norm`` runs Apex's kernel for this input."""
    return FusedRMSNormAffineMixedDtypesFunction is not None and ENABLED and on_gpu(x)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Apex's kernel for this input, or None where it does not apply (no Apex, turned off, not a GPU tensor)."""
    if not applies(x):
        return None
    return FusedRMSNormAffineMixedDtypesFunction.apply(x, weight, tuple(weight.shape), eps)
