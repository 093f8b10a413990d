"""Transformer Engine's Float8BlockScaling recipe (DeepSeek-V3's tiles) behind moelib's Backend interface.

Import-guarded: nothing here imports transformer_engine until the fp8-te backend is built, and building it
where TE or a suitable GPU is missing raises BackendUnavailableError saying why and what would work.

Each moelib Linear's weight is handed to a ``te.pytorch.Linear`` made for it on first use (the Parameter
itself, so the optimiser, checkpoints and parameter names see nothing new). The TE modules are held in a
dict keyed by the weight, outside the module tree, so ``state_dict`` keeps moelib's names.

Routed experts do not go through TE: ``te.pytorch.GroupedLinear`` owns one Parameter per expert, which
cannot alias moelib's stacked [E, out, in] weights, so they use moelib's FP8 grouped function (Triton
kernels where they run, else the PyTorch core) with the same tiles and scales.

Per-Linear power-of-two inputs (o_proj, experts) cannot be expressed in one TE recipe; under fp8-te every
tensor follows ``PrecisionConfig.pow2_scales``. This file is not exercised by the CPU test suite (TE
cannot be installed there); its tests skip with that reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch

from moelib.errors import BackendUnavailableError


def te_unavailable_reason() -> str | None:
    """None when the fp8-te backend can run here, else one sentence saying why not and what would."""
    if importlib.util.find_spec("transformer_engine") is None:
        return ("Transformer Engine is not installed (pip install 'transformer-engine[pytorch]' on a CUDA machine); "
                "use fp8-emulated, or fp8-triton where Triton runs.")
    if not torch.cuda.is_available():
        return "Transformer Engine needs a CUDA GPU and none is visible; use fp8-emulated."
    try:
        te = _import_te()
    except Exception as exc:  # a broken TE build raises anything from ImportError to OSError
        return f"Transformer Engine failed to import ({type(exc).__name__}: {exc}); use fp8-emulated or fp8-triton."
    recipe_mod = _recipe_module()
    if not hasattr(recipe_mod, "Float8BlockScaling"):
        return (f"Transformer Engine {getattr(te, '__version__', '?')} has no Float8BlockScaling recipe (TE >= 2.3 "
                f"does); use fp8-triton or fp8-emulated.")
    ok, why = _block_scaling_support(te)
    if not ok:
        return f"Transformer Engine cannot run Float8BlockScaling on this GPU ({why}); use fp8-triton."
    return None


def _import_te() -> Any:
    import transformer_engine.pytorch as te

    return te


def _recipe_module() -> Any:
    from transformer_engine.common import recipe

    return recipe


def _block_scaling_support(te: Any) -> tuple[bool, str]:
    # The check moved between TE releases: te.pytorch.is_fp8_block_scaling_available (newer) or
    # te.pytorch.fp8.check_fp8_block_scaling_support (2.3-2.7).
    check = getattr(te, "is_fp8_block_scaling_available", None)
    if check is not None:
        return check(return_reason=True)
    legacy = getattr(getattr(te, "fp8", None), "check_fp8_block_scaling_support", None)
    return legacy() if legacy is not None else (True, "")


def make_recipe(pow2_scales: bool) -> Any:
    """Float8BlockScaling: E4M3 everywhere, 1×128 activations/gradients, 128×128 weights, split accumulation."""
    recipe = _recipe_module()
    r = recipe.Float8BlockScaling(fp8_format=recipe.Format.E4M3)
    if hasattr(recipe, "QParams"):  # otherwise TE's default (power-of-two scales) stands
        q = recipe.QParams(power_2_scale=pow2_scales, amax_epsilon=0.0)
        r.fp8_quant_fwd_inp = r.fp8_quant_fwd_weight = r.fp8_quant_bwd_grad = q
    return r


class TeLinears:
    """One te.pytorch.Linear per moelib weight, created on first use and sharing the Parameter."""

    def __init__(self) -> None:
        self.te = _import_te()
        self._modules: dict[int, tuple[torch.Tensor, torch.nn.Module]] = {}

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        entry = self._modules.get(id(weight))
        if entry is None or entry[0] is not weight:
            out_features, in_features = weight.shape
            module = self.te.Linear(in_features, out_features, bias=False, params_dtype=weight.dtype,
                                    device=weight.device)
            module.weight = weight  # alias moelib's Parameter: one master weight, one .grad
            entry = self._modules[id(weight)] = (weight, module)
        return entry[1](x)


@contextlib.contextmanager
def te_autocast(recipe: Any) -> Iterator[None]:
    """TE's FP8 region with ``recipe`` (``te.pytorch.autocast`` in new releases, ``fp8_autocast`` before)."""
    te = _import_te()
    if hasattr(te, "autocast"):
        ctx = te.autocast(enabled=True, recipe=recipe)
    else:
        ctx = te.fp8_autocast(enabled=True, fp8_recipe=recipe)
    with ctx:
        yield


def require_te() -> None:
    reason = te_unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"PrecisionConfig.backend fp8-te cannot run here: {reason}")
