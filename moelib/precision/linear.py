"""The FP8 Linear (DeepSeek-V3's recipe, REFERENCE §4) as autograd functions, dense and grouped.

For Y = X·Wᵀ with X [M, K] (leading dims flattened), W [N, K]:

    forward      Y  = X·Wᵀ    X in 1×128 tiles along K,     W in 128×128 blocks
    input-grad   dX = dY·W    dY in 1×128 tiles along N,    Wᵀ = W's blocks transposed (no requantisation)
    weight-grad  dW = dYᵀ·X   dYᵀ and Xᵀ in 1×128 tiles along the tokens M

Every GEMM takes E4M3 operands and accumulates in fp32 with the scale product applied per 128-wide K
block (``fp8_gemm``). The input is saved for backward as its fp8 data and scales, never in bf16; the
weight-grad GEMM re-tiles it along tokens (``requantize_transposed``). The weight itself (fp32 or bf16
master) is saved as the Parameter (no copy) and re-quantised in backward, which gives the forward's
blocks bit for bit. Autocast is switched off inside: the fp8 partial products must be summed in fp32,
and autocast would run them in bf16.

The weight-grad GEMM goes straight into ``weight.grad`` and can be deferred (moelib.precision.weight_grad).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from moelib.precision import fp8, weight_cache
from moelib.precision.telemetry import Fp8Telemetry
from moelib.precision.weight_grad import accumulate_weight_grad, write_

TILE = fp8.TILE
ACT, WEIGHT = (1, TILE), (TILE, TILE)


@dataclass(frozen=True)
class Fp8Kernels:
    """The five functions the FP8 Linear needs; the emulated core and moelib_cuda share their signatures."""

    name: str
    quantize: Callable
    quantize_transposed: Callable
    requantize_transposed: Callable
    fp8_gemm: Callable
    fp8_grouped_gemm: Callable


EMULATED = Fp8Kernels("emulated", fp8.quantize, fp8.quantize_transposed, fp8.requantize_transposed,
                      fp8.fp8_gemm, fp8.fp8_grouped_gemm)


def triton_kernels() -> Fp8Kernels:
    """moelib_cuda's kernels behind moelib's checks (the caller checks
    ``moelib_cuda.triton_unavailable_reason()`` first)."""
    from moelib.precision import fp8_triton as k

    return Fp8Kernels("triton", k.quantize, k.quantize_transposed, k.requantize_transposed, k.fp8_gemm,
                      k.fp8_grouped_gemm)


@dataclass(frozen=True)
class Fp8Options:
    """Per-call numerics: which kernels, and where scales are rounded to powers of two."""

    kernels: Fp8Kernels = EMULATED
    pow2_scales: bool = False  # every tensor (PrecisionConfig.pow2_scales)
    pow2_input: bool = False   # this GEMM's input (V3: attention-output projection, expert input)

    @property
    def pow2_x(self) -> bool:
        return self.pow2_scales or self.pow2_input


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What a Linear computes in and returns here: the autocast dtype under autocast, else x's dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _wgrad_operands(k: Fp8Kernels, dy: torch.Tensor, qx: torch.Tensor, sx: torch.Tensor | None, pow2_dy: bool,
                    pow2_x: bool, name: str) -> tuple[torch.Tensor, ...]:
    """dYᵀ and Xᵀ in 1×128 tiles along tokens: the weight-grad GEMM contracts over them. X is the forward's
    FP8 copy (qx, sx), re-tiled, or (sx None) an input recomputed in high precision, tiled once."""
    qg, sg = k.quantize_transposed(dy, pow2_scale=pow2_dy, name=f"{name} output gradient")
    if sx is None:
        qxt, sxt = k.quantize_transposed(qx, pow2_scale=pow2_x, name=f"{name} input")
    else:
        qxt, sxt = k.requantize_transposed(qx, sx, ACT, pow2_scale=pow2_x, name=f"{name} input")
    return qg, sg, qxt, sxt


class _SharedInput(threading.local):
    x: torch.Tensor | None = None
    quantized: dict | None = None


_shared = _SharedInput()


@contextlib.contextmanager
def shared_input(x: torch.Tensor) -> Iterator[None]:
    """FP8 Linears called on this very tensor inside the block quantise it once and save that one copy for
    backward: an MLP's gate and up projections, which V3 runs as one GEMM on one FP8 copy of the input."""
    prev = (_shared.x, _shared.quantized)
    _shared.x, _shared.quantized = x, {}
    try:
        yield
    finally:
        _shared.x, _shared.quantized = prev


class _OutputsAgain(threading.local):
    seen: list | None = None  # set inside ``outputs_again``


_outputs_again = _OutputsAgain()


@contextlib.contextmanager
def outputs_again() -> Iterator[list]:
    """Collects, for the Linears called inside the block with autograd on, functions recomputing their outputs
    bit for bit from what they keep for backward anyway (their input, FP8 or not, and weight): a caller may
    keep such a function instead of the output, or of a sum it went into."""
    prev = _outputs_again.seen
    _outputs_again.seen = seen = []
    try:
        yield seen
    finally:
        _outputs_again.seen = prev


def record_output_again(again: Callable[[], torch.Tensor]) -> None:
    """Hands ``again`` to the enclosing ``outputs_again`` block, if any."""
    if _outputs_again.seen is not None:
        _outputs_again.seen.append(again)


def _quantize_input(k: Fp8Kernels, x: torch.Tensor, x2: torch.Tensor, pow2: bool,
                    name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (x as [tokens, features]) in 1×128 tiles; once per ``shared_input`` block when x is its tensor."""
    if x is not _shared.x:
        return k.quantize(x2, ACT, pow2_scale=pow2, name=f"{name} input")
    key = (id(k), pow2)
    if key not in _shared.quantized:
        _shared.quantized[key] = k.quantize(x2, ACT, pow2_scale=pow2, name=f"{name} input")
    return _shared.quantized[key]


class Fp8LinearFunction(torch.autograd.Function):
    """y = x·weightᵀ with all three GEMMs in FP8. apply(x, weight, options, name, telemetry, input_again):
    with ``input_again`` the FP8 input is not kept (see Fp8GroupedLinearFunction)."""

    @staticmethod
    def forward(ctx, x, weight, opts: Fp8Options, name: str, telemetry: Fp8Telemetry | None,
                input_again: Callable[[], torch.Tensor] | None = None):
        k, out_dtype = opts.kernels, compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            qx, sx = _quantize_input(k, x, x2, opts.pow2_x, name)
            w = weight.detach()
            qw, sw = _quantized_weight(k, weight, opts.pow2_scales, name)
            y = k.fp8_gemm(qx, sx, qw, sw, out_dtype)
        sampled = telemetry is not None and telemetry.sample()
        if sampled:
            telemetry.record("input", x2, qx, ACT)
            telemetry.record("weight", w, qw, WEIGHT)
        ctx.input_again = input_again
        if input_again is not None:
            qx = sx = qx.new_empty(0)  # a new storage: a view would keep the FP8 input alive
        else:
            record_output_again(functools.partial(_fp8_output, k, qx, sx, weight, opts, name, out_dtype,
                                                  (*x.shape[:-1], weight.shape[0])))
        ctx.save_for_backward(qx, sx, weight)
        ctx.weight = weight  # the parameter object itself, whose .grad dW goes into (a saved tensor may be a copy)
        ctx.opts, ctx.name, ctx.x_shape, ctx.x_dtype = opts, name, x.shape, x.dtype
        ctx.telemetry = telemetry if sampled else None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        qx, sx, weight = ctx.saved_tensors
        opts, name = ctx.opts, ctx.name
        k = opts.kernels
        dy = dy.reshape(-1, dy.shape[-1])
        grad_x = grad_w = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                qg, sg = k.quantize(dy, ACT, pow2_scale=opts.pow2_scales, name=f"{name} output gradient")
                qw, sw = _quantized_weight(k, weight, opts.pow2_scales, name)
                # Wᵀ's 128×128 blocks are W's blocks transposed: pass the transposed views, no requantisation.
                grad_x = k.fp8_gemm(qg, sg, qw.t(), sw.t(), ctx.x_dtype).view(ctx.x_shape)
                if ctx.telemetry is not None:
                    ctx.telemetry.record("grad", dy, qg, ACT)
            if ctx.needs_input_grad[1]:
                if ctx.input_again is not None:
                    x = ctx.input_again()
                    qx, sx = x.reshape(-1, x.shape[-1]), None  # _wgrad_operands: tiled once
                ops = _wgrad_operands(k, dy, qx, sx, opts.pow2_scales, opts.pow2_x, name)
                grad_w = accumulate_weight_grad(ctx.weight, lambda g, accumulate: write_(
                    g, k.fp8_gemm(*ops, torch.float32, b_block=ACT), accumulate))
        return grad_x, grad_w, None, None, None, None


def _fp8_output(k: Fp8Kernels, qx, sx, weight, opts: Fp8Options, name: str, dtype: torch.dtype,
                shape: torch.Size) -> torch.Tensor:
    """Fp8LinearFunction's forward GEMM again, from its kept FP8 input."""
    with torch.no_grad(), torch.autocast(qx.device.type, enabled=False):
        return k.fp8_gemm(qx, sx, *_quantized_weight(k, weight, opts.pow2_scales, name), dtype).view(shape)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, opts: Fp8Options = Fp8Options(), name: str = "linear",
               telemetry: Fp8Telemetry | None = None,
               input_again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """x·weightᵀ (bias-free) with FP8 forward, input-grad and weight-grad GEMMs; x [..., K], weight [N, K]."""
    return Fp8LinearFunction.apply(x, weight, opts, name, telemetry, input_again)


# ---- grouped (routed experts) ---------------------------------------------------------------------------


def quantize_experts(k: Fp8Kernels, w: torch.Tensor, pow2: bool, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] weights in 128×128 blocks per expert: data [E, N, K], scale_inv [E, ⌈N/128⌉, ⌈K/128⌉]."""
    e, n, kk = w.shape
    if n % TILE == 0:  # blocks cannot straddle experts: one call over all of them
        q, s = k.quantize(w.reshape(e * n, kk), WEIGHT, pow2_scale=pow2, name=name)
        return q.view(e, n, kk), s.view(e, n // TILE, -1)
    parts = [k.quantize(w[i], WEIGHT, pow2_scale=pow2, name=name) for i in range(e)]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def _quantized_weight(k: Fp8Kernels, w: torch.Tensor, pow2: bool, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w in 128×128 blocks, quantised once per optimizer step (moelib.precision.weight_cache)."""
    return weight_cache.cached(w, ("fp8", k.name, pow2),
                               lambda: k.quantize(w.detach(), WEIGHT, pow2_scale=pow2, name=f"{name} weight"))


def _quantized_experts(k: Fp8Kernels, w: torch.Tensor, pow2: bool, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return weight_cache.cached(w, ("fp8", k.name, pow2),
                               lambda: quantize_experts(k, w.detach(), pow2, f"{name} weight"))


class Fp8GroupedLinearFunction(torch.autograd.Function):
    """Routed experts' y[rows of e] = x[rows of e]·weight[e]ᵀ, all three GEMMs in FP8.

    apply(x [S, K] sorted by expert, weight [E, N, K], counts [E], options, name, telemetry, input_again). The
    forward and input-grad GEMMs are one grouped GEMM each; the weight-grad GEMM loops over experts, because
    each expert's tokens must be re-tiled along tokens on their own (a tile may not straddle two experts).
    With ``input_again`` (a function returning x again, e.g. SwiGLU's output recomputed from its FP8-cached
    inputs, as V3 does) the FP8 input is not kept: the weight-grad GEMM tiles the recomputed x instead.
    """

    @staticmethod
    def forward(ctx, x, weight, counts, opts: Fp8Options, name: str, telemetry: Fp8Telemetry | None,
                input_again: Callable[[], torch.Tensor] | None = None):
        k, out_dtype = opts.kernels, compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            qx, sx = k.quantize(x, ACT, pow2_scale=opts.pow2_x, name=f"{name} input")
            w = weight.detach()
            qw, sw = _quantized_experts(k, weight, opts.pow2_scales, name)
            y = k.fp8_grouped_gemm(qx, sx, qw, sw, counts, out_dtype)
        sampled = telemetry is not None and telemetry.sample()
        if sampled:
            telemetry.record("input", x, qx, ACT)
            telemetry.record("weight", w, qw, WEIGHT)
        ctx.input_again = input_again
        if input_again is not None:
            qx = sx = qx.new_empty(0)  # a new storage: a view would keep the FP8 input alive
        ctx.save_for_backward(qx, sx, weight, counts)
        ctx.weight = weight
        ctx.opts, ctx.name, ctx.x_dtype = opts, name, x.dtype
        ctx.telemetry = telemetry if sampled else None
        return y

    @staticmethod
    def backward(ctx, dy):
        qx, sx, weight, counts = ctx.saved_tensors
        if ctx.input_again is not None and ctx.needs_input_grad[1]:
            qx, sx = ctx.input_again(), None  # _wgrad_operands: x in high precision, tiled once
        opts, name = ctx.opts, ctx.name
        k = opts.kernels
        dy = dy.contiguous()
        grad_x = grad_w = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                qg, sg = k.quantize(dy, ACT, pow2_scale=opts.pow2_scales, name=f"{name} output gradient")
                qw, sw = _quantized_experts(k, weight, opts.pow2_scales, name)
                grad_x = k.fp8_grouped_gemm(qg, sg, qw.transpose(1, 2), sw.transpose(1, 2), counts, ctx.x_dtype)
                if ctx.telemetry is not None:
                    ctx.telemetry.record("grad", dy, qg, ACT)
            if ctx.needs_input_grad[1]:
                groups, start = [], 0  # per expert: its dW operands, None without tokens
                for size in counts.tolist():
                    rows = slice(start, start + size)
                    groups.append(_wgrad_operands(k, dy[rows], qx[rows], None if sx is None else sx[rows],
                                                  opts.pow2_scales, opts.pow2_x, name) if size else None)
                    start += size

                def write_weight_grad(grad_w: torch.Tensor, accumulate: bool) -> None:
                    for e, ops in enumerate(groups):
                        if ops is not None:
                            write_(grad_w[e], k.fp8_gemm(*ops, torch.float32, b_block=ACT), accumulate)
                        elif not accumulate:
                            grad_w[e].zero_()  # an expert without tokens

                grad_w = accumulate_weight_grad(ctx.weight, write_weight_grad)
        return grad_x, grad_w, None, None, None, None, None


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                       opts: Fp8Options = Fp8Options(), name: str = "experts",
                       telemetry: Fp8Telemetry | None = None,
                       input_again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Grouped FP8 Linear over experts' contiguous token groups (see Fp8GroupedLinearFunction)."""
    return Fp8GroupedLinearFunction.apply(x, weight, counts, opts, name, telemetry, input_again)
