"""Precision backends: the model asks here for its Linears; the backend decides the numerics.

The model never branches on the backend. Modules that DeepSeek-V3 keeps in high precision (embedding,
output head, MoE gate, norms, attention core) do not come from here and say so where they are built.

    fp32          plain fp32 GEMMs
    bf16          fp32 master weights, bf16 GEMMs under autocast
    fp8-emulated  bf16 autocast for the high-precision parts; every Linear's three GEMMs in FP8 with V3's
                  tiles, in pure PyTorch (moelib.precision.fp8): runs anywhere, the CPU default for FP8
    fp8-triton    the same numerics with moelib_cuda's Triton kernels (a GPU, or the CPU interpreter)
    fp8-te        Transformer Engine's Float8BlockScaling recipe (moelib.precision.te)

``get_backend`` builds one; an FP8 backend that cannot run here raises BackendUnavailableError then, at
start-up, not at the first GEMM. Apex is not used: its FusedAdam and FusedRMSNorm would replace the
optimiser and the norm, which live outside the precision layer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from moelib.config import PrecisionConfig
from moelib.errors import BackendUnavailableError
from moelib.precision.grouped import expert_row_multiple, grouped_linear, linear
from moelib.precision.linear import (
    EMULATED,
    Fp8Kernels,
    Fp8Options,
    fp8_grouped_linear,
    fp8_linear,
    outputs_again,
    triton_kernels,
)
from moelib.precision.telemetry import telemetry_for


class Backend:
    """fp32 / bf16: plain GEMMs; bf16 runs them under autocast with fp32 master weights.

    ``pow2_input`` (power-of-two scales for this GEMM's input) and ``name`` (for error messages) only
    matter to the FP8 backends.
    """

    is_fp8 = False

    def __init__(self, cfg: PrecisionConfig):
        self.cfg = cfg
        self.name = cfg.backend
        self.compute_dtype = torch.float32 if cfg.backend == "fp32" else torch.bfloat16

    def linear(self, x: torch.Tensor, weight: torch.Tensor, *, pow2_input: bool = False,
               name: str = "linear", input_again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """``input_again``: a function recomputing x in backward; a backend may keep less instead of x (FP8
        ones do: the weight-grad GEMM quantises the recomputed x)."""
        return linear(x, weight)

    def grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, *,
                       pow2_input: bool = False, name: str = "experts",
                       input_again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """As ``linear``, for experts' rows grouped by ``counts``."""
        return grouped_linear(x, weight, counts)

    def expert_row_multiple(self, x: torch.Tensor) -> int:
        """Pad each expert's rows to this multiple before ``grouped_linear`` (see grouped.expert_row_multiple)."""
        return expert_row_multiple(x)

    @contextlib.contextmanager
    def autocast(self, device_type: str = "cpu") -> Iterator[None]:
        if self.compute_dtype == torch.float32:
            yield
        else:
            with torch.autocast(device_type, dtype=self.compute_dtype):
                yield


class Fp8Backend(Backend):
    """Every Linear in FP8 (moelib.precision.linear); everything else as bf16 (autocast)."""

    is_fp8 = True

    def __init__(self, cfg: PrecisionConfig, kernels: Fp8Kernels):
        super().__init__(cfg)
        self.kernels = kernels

    def options(self, pow2_input: bool) -> Fp8Options:
        return Fp8Options(self.kernels, self.cfg.pow2_scales, pow2_input)

    def telemetry(self, weight: torch.Tensor):
        return telemetry_for(weight, self.cfg.telemetry_interval, self.cfg.amax_history_len)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, *, pow2_input: bool = False,
               name: str = "linear", input_again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        return fp8_linear(x, weight, self.options(pow2_input), name, self.telemetry(weight), input_again)

    def expert_row_multiple(self, x: torch.Tensor) -> int:
        return 1  # FP8 GEMMs are emulated in fp32 or run by Triton/TE kernels, which do not rebuild per shape

    def grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, *,
                       pow2_input: bool = False, name: str = "experts",
                       input_again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        return fp8_grouped_linear(x, weight, counts, self.options(pow2_input), name, self.telemetry(weight),
                                  input_again)


class TeBackend(Fp8Backend):
    """Dense Linears through Transformer Engine; routed experts through moelib's FP8 grouped GEMM."""

    def __init__(self, cfg: PrecisionConfig):
        from moelib.precision import te

        te.require_te()
        super().__init__(cfg, _triton_or_emulated())
        self._te = te
        self._linears = te.TeLinears()
        self._recipe = te.make_recipe(cfg.pow2_scales)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, *, pow2_input: bool = False,
               name: str = "linear", input_again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        return self._linears(x, weight)  # TE keeps its own FP8 copy of x

    @contextlib.contextmanager
    def autocast(self, device_type: str = "cuda") -> Iterator[None]:
        with torch.autocast(device_type, dtype=self.compute_dtype), self._te.te_autocast(self._recipe):
            yield


def _triton_reason() -> str | None:
    import moelib_cuda

    return moelib_cuda.triton_unavailable_reason()


def _triton_or_emulated() -> Fp8Kernels:
    return triton_kernels() if _triton_reason() is None else EMULATED


def get_backend(cfg: PrecisionConfig | str | None = None) -> Backend:
    """The backend ``cfg`` names, checked here so an unusable one fails at start-up with the reason."""
    if cfg is None:
        cfg = PrecisionConfig(backend="fp32")
    elif isinstance(cfg, str):
        cfg = PrecisionConfig(backend=cfg)
    if cfg.backend == "fp8-emulated":
        return Fp8Backend(cfg, EMULATED)
    if cfg.backend == "fp8-triton":
        reason = _triton_reason()
        if reason is not None:
            raise BackendUnavailableError(f"PrecisionConfig.backend fp8-triton cannot run here: {reason}")
        if not torch.cuda.is_available():
            logging.getLogger("moelib").warning("fp8-triton runs in Triton's CPU interpreter here (no CUDA GPU): "
                                                "exact but very slow; fp8-emulated has the same numerics.")
        return Fp8Backend(cfg, triton_kernels())
    if cfg.backend == "fp8-te":
        return TeBackend(cfg)
    return Backend(cfg)


class Linear(nn.Module):
    """A bias-free Linear whose GEMMs belong to the precision backend. Weight layout [out, in] as
    nn.Linear, so state dicts are the same whatever the backend.

    ``pow2_input``: quantise this Linear's input with power-of-two scales under FP8 (V3 does so for the
    attention-output projection, whose input it caches in a custom format). ``name`` appears in error
    messages; ``name_linears(model)`` sets it to the module path.
    """

    def __init__(self, in_features: int, out_features: int, backend: Backend, pow2_input: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.pow2_input = pow2_input
        self.name = f"Linear({in_features}->{out_features})"
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor, input_again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """x·weightᵀ; ``input_again`` (see Backend.linear) lets an FP8 backend keep no copy of x."""
        return self.backend.linear(x, self.weight, pow2_input=self.pow2_input, name=self.name,
                                   input_again=input_again)

    def forward_again(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[], torch.Tensor] | None]:
        """(``forward(x)``, a function recomputing that output bit for bit from what the backend keeps for
        backward anyway, or None where the backend offers none (Transformer Engine, no autograd))."""
        with outputs_again() as seen:
            y = self(x)
        return y, (seen[-1] if seen else None)

    def extra_repr(self) -> str:
        pow2 = ", pow2_input" if self.pow2_input else ""
        return f"in={self.in_features}, out={self.out_features}, backend={self.backend.name}{pow2}"


def name_linears(model: nn.Module) -> None:
    """Name every Linear after its module path (``layers.3.self_attn.o_proj``), for error messages."""
    for path, module in model.named_modules():
        if isinstance(module, Linear):
            module.name = path
