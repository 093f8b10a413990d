"""The FP8 Linear (moelib.precision.linear): its three GEMMs against fp64 within a bound derived from the tile
errors, its gradient against autograd of the dequantised computation, the FP8 input cache, deferred weight
grads, bad input, the grouped variant, the Triton kernels, and a whole model under fp8-emulated.

Bounds (see tests/property/test_fp8.py for the derivation): quantising x with tile scale s moves it by at most
E(x) = max(2^-4·|x|, 2^-10·s); a GEMM of quantised operands differs from the exact product of the originals
by at most |a|·E_bᵀ + E_a·|b|ᵀ + E_a·E_bᵀ plus fp32 arithmetic, γ_(128+⌈K/128⌉+2)·(|a|+E_a)·(|b|+E_b)ᵀ.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import moelib_cuda
from moelib import BackendUnavailableError, DataError, ModelConfig, PrecisionConfig
from moelib.model import build_model
from moelib.precision import fp8
from moelib.precision.backends import Linear, get_backend, name_linears
from moelib.precision.linear import (
    EMULATED,
    Fp8Options,
    fp8_grouped_linear,
    fp8_linear,
    triton_kernels,
)
from moelib.precision.telemetry import collect_telemetry
from moelib.precision.weight_grad import WeightGradStore

SLACK = 1 + 2.0**-16
U = 2.0**-24
ACT, WEIGHT = (1, 128), (128, 128)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _spread(shape, seed, lo=-8, hi=8):
    """Gaussian values times 2^[lo, hi]: magnitudes mixed within every tile."""
    g = _gen(seed)
    return torch.randn(*shape, generator=g) * torch.pow(2.0, torch.randint(lo, hi + 1, shape, generator=g).float())


def _err(x, block, pow2=False):
    """Elementwise quantisation error bound E(x) for x quantised in ``block`` tiles, fp64."""
    _, s = fp8.quantize(x, block, pow2_scale=pow2)
    s_full = fp8.expand_scale(s, block, x.shape).double()
    return torch.maximum(x.double().abs() * 2.0**-4, s_full * 2.0**-10) * SLACK


def _bound(a, ea, b, eb):
    """|fp8 GEMM(a, b) − a·bᵀ| bound (a [M, K], b [N, K], errors ea, eb of the same shapes), fp64."""
    a, b = a.double().abs(), b.double().abs()
    n = 128 + -(-a.shape[1] // 128) + 2
    gamma = n * U / (1 - n * U)
    return a @ eb.t() + ea @ b.t() + ea @ eb.t() + gamma * ((a + ea) @ (b + eb).t())


def _run(x, w, g, opts=None):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(x, w, opts or Fp8Options())
    y.backward(g)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("m,k,n", [(70, 200, 300), (5, 128, 256), (130, 40, 7)])
def test_three_gemms_within_tile_bound_of_fp64(m, k, n):
    """Y = X·Wᵀ, dX = dY·W and dW = dYᵀ·X against exact fp64 products of the unquantised operands."""
    x, w, g = _spread((2, m, k), 1), _spread((n, k), 2) * 0.01, _spread((2, m, n), 3)
    y, dx, dw = _run(x, w, g)
    assert y.shape == (2, m, n) and dx.shape == x.shape and dw.shape == w.shape
    x2, g2 = x.reshape(-1, k), g.reshape(-1, n)
    ew = _err(w, WEIGHT)
    # forward: X in 1×128 tiles along K, W in 128×128 blocks
    bound = _bound(x2, _err(x2, ACT), w, ew)
    assert bool(((y.reshape(-1, n).double() - x2.double() @ w.double().t()).abs() <= bound).all())
    # input grad: dY in 1×128 tiles along N, Wᵀ in W's blocks transposed
    bound = _bound(g2, _err(g2, ACT), w.t(), ew.t())
    assert bool(((dx.reshape(-1, k).double() - g2.double() @ w.double()).abs() <= bound).all())
    # weight grad: dYᵀ tiled along tokens; Xᵀ quantised twice (forward tiles, then along tokens)
    xq = fp8.dequantize(*fp8.quantize(x2, ACT), ACT)
    ex = _err(x2, ACT).t() + _err(xq.t(), ACT)
    bound = _bound(g2.t(), _err(g2.t(), ACT), x2.t(), ex)
    assert bool(((dw.double() - g2.double().t() @ x2.double()).abs() <= bound).all())


def test_gradient_matches_autograd_of_dequantised_computation():
    """fp64 autograd of X̃·W̃ᵀ (X̃, W̃ quantised as the forward does): the forward agrees up to fp32 arithmetic,
    the gradients up to the quantisation of dY (and of X̃ along tokens for dW)."""
    m, k, n = 150, 300, 140
    x, w, g = _spread((m, k), 4), _spread((n, k), 5) * 0.01, _spread((m, n), 6, -3, 3)
    y, dx, dw = _run(x, w, g)
    xd = fp8.dequantize(*fp8.quantize(x, ACT), ACT).double().requires_grad_()
    wd = fp8.dequantize(*fp8.quantize(w, WEIGHT), WEIGHT).double().requires_grad_()
    y_ref = xd @ wd.t()
    y_ref.backward(g.double())
    zero = torch.zeros_like
    assert bool(((y.double() - y_ref.detach()).abs() <= _bound(xd.detach(), zero(xd), wd.detach(), zero(wd))).all())
    bound = _bound(g, _err(g, ACT), wd.detach().t(), zero(wd).t())
    assert bool(((dx.double() - xd.grad).abs() <= bound).all())
    bound = _bound(g.t(), _err(g.t(), ACT), xd.detach().t(), _err(xd.detach().t().float(), ACT))
    assert bool(((dw.double() - wd.grad).abs() <= bound).all())
    # and the bound is not vacuous: the gradients are close in norm
    assert float((dx.double() - xd.grad).norm() / xd.grad.norm()) < 0.05
    assert float((dw.double() - wd.grad).norm() / wd.grad.norm()) < 0.05


def test_input_cached_in_fp8_not_bf16():
    x = torch.randn(4, 33, 200, dtype=torch.bfloat16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(96, 200) * 0.02)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, w)
    assert y.dtype == torch.bfloat16
    saved = y.grad_fn.saved_tensors
    activations = [t for t in saved if t.data_ptr() != w.data_ptr()]
    assert any(t is w or t.data_ptr() == w.data_ptr() for t in saved)  # the master weight, not a copy
    dtypes = sorted(str(t.dtype) for t in activations)
    assert dtypes == ["torch.float32", "torch.float8_e4m3fn"], dtypes
    data = next(t for t in activations if t.dtype == torch.float8_e4m3fn)
    scales = next(t for t in activations if t.dtype == torch.float32)
    assert data.shape == (132, 200) and scales.shape == (132, 2)
    cached = sum(t.numel() * t.element_size() for t in activations)
    assert cached == 132 * 200 + 132 * 2 * 4
    assert cached <= 0.55 * x.numel() * 2  # vs the bf16 input a bf16 Linear would keep


@pytest.mark.parametrize("precision", ["bf16", "fp8-emulated"])
def test_mlp_gate_and_up_share_one_copy_of_their_input(precision, monkeypatch):
    """An MLP's gate and up projections read one cast (bf16) or one quantisation (FP8) of the input, saved
    once for backward; the numbers are those of two Linears quantising it each, bit for bit."""
    from moelib.model import mlp as mlp_mod

    backend = get_backend(precision)
    torch.manual_seed(0)
    mlp = mlp_mod.MLP(256, 128, backend)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 40, 256, requires_grad=True)

    def run():
        """Output, gradients, and how many storages of the input's size are saved for backward."""
        x.grad = None
        for p in mlp.parameters():
            p.grad = None
        saved = {}

        def pack(t):
            if t.shape[-1] == 256 and t.numel() == 120 * 256 and t.untyped_storage().data_ptr() != x.data_ptr():
                saved[t.untyped_storage().data_ptr()] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), backend.autocast("cpu"):
            y = mlp(x)
        y.float().square().sum().backward()
        return y.detach(), x.grad.clone(), [p.grad.clone() for p in mlp.parameters()], len(saved)

    shared = run()
    monkeypatch.setattr(mlp_mod, "shared_input", lambda x: contextlib.nullcontext())
    separate = run()
    assert shared[3] == 1 and separate[3] == (2 if precision == "fp8-emulated" else 1)
    assert torch.equal(shared[0], separate[0]) and torch.equal(shared[1], separate[1])
    assert all(torch.equal(a, b) for a, b in zip(shared[2], separate[2]))
    monkeypatch.setattr(mlp_mod, "compute_dtype", lambda x: x.dtype)  # each Linear casts for itself
    assert run()[3] == 2


def test_deferred_weight_grad_equals_immediate():
    x, w, g = _spread((50, 260), 7), _spread((130, 260), 8) * 0.01, _spread((50, 130), 9)
    _, dx_now, dw_now = _run(x, w, g)
    xd, wd = x.clone().requires_grad_(), w.clone().requires_grad_()
    wd.grad = torch.ones_like(wd)  # deferred grads accumulate like autograd's
    WeightGradStore.clear()
    with WeightGradStore.deferred():
        fp8_linear(xd, wd).backward(g)
        assert torch.equal(wd.grad, torch.ones_like(wd))  # the W pass has not run yet
    assert torch.equal(xd.grad, dx_now) and WeightGradStore.pending() == 1
    WeightGradStore.pop()
    assert WeightGradStore.pending() == 0
    assert torch.equal(wd.grad, dw_now + 1)


def test_deferred_grouped_and_non_leaf_weights():
    x, w, g = _spread((40, 130), 10), _spread((3, 256, 130), 11) * 0.01, _spread((40, 256), 12)
    counts = torch.tensor([25, 0, 15])
    grads = []
    for defer in (False, True):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        with WeightGradStore.deferred() if defer else torch.enable_grad():
            fp8_grouped_linear(xx, ww, counts).backward(g)
        WeightGradStore.pop_all()
        grads.append((xx.grad, ww.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    # a weight that is a cast (not a leaf) cannot take a later .grad: its weight grad is computed at once
    master = w[0].clone().requires_grad_()
    with WeightGradStore.deferred():
        fp8_linear(x, master.to(torch.float32) * 1.0).sum().backward()
    assert master.grad is not None
    # every deferred block queues one group, empty here (and under bf16), so B and W pair one to one
    with WeightGradStore.deferred():
        get_backend("bf16").linear(x, master).sum().backward()
    assert WeightGradStore.pending() == 2
    WeightGradStore.pop_all()
    with pytest.raises(RuntimeError, match="no deferred weight-grad group"):
        WeightGradStore.pop()


def test_grouped_equals_per_expert_dense():
    """The grouped function is the dense one per expert, bit for bit (empty experts, N not a multiple of 128)."""
    counts = [30, 0, 140, 1]
    x, w, g = _spread((171, 200), 13), _spread((4, 100, 200), 14) * 0.01, _spread((171, 100), 15)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_grouped_linear(xx, ww, torch.tensor(counts), Fp8Options(pow2_input=True))
    y.backward(g)
    start = 0
    for e, size in enumerate(counts):
        rows = slice(start, start + size)
        ye, dxe, dwe = _run(x[rows], w[e], g[rows], Fp8Options(pow2_input=True))
        assert torch.equal(y[rows].detach(), ye) and torch.equal(xx.grad[rows], dxe)
        assert torch.equal(ww.grad[e], dwe if size else torch.zeros_like(w[e]))
        start += size


def test_pow2_input_and_pow2_scales():
    x, w = torch.randn(10, 300) * 3, torch.nn.Parameter(torch.randn(20, 300))

    def saved_scales(opts):
        y = fp8_linear(x, w, opts)
        return [t for t in y.grad_fn.saved_tensors if t.dtype == torch.float32 and t.shape == (10, 3)][0]

    def is_pow2(s):
        return bool((torch.frexp(s)[0] == 0.5).all())

    assert not is_pow2(saved_scales(Fp8Options()))
    assert is_pow2(saved_scales(Fp8Options(pow2_input=True)))
    assert is_pow2(saved_scales(Fp8Options(pow2_scales=True)))


def test_model_marks_o_proj_and_expert_input_pow2(monkeypatch):
    cfg = ModelConfig.from_preset("tiny")
    model = build_model(cfg, "fp8-emulated", seed=0)
    assert model.layers["0"].self_attn.o_proj.pow2_input
    assert not model.layers["0"].self_attn.kv_b_proj.pow2_input
    experts = model.layers["1"].mlp.experts
    seen = []
    original = experts.backend.grouped_linear
    monkeypatch.setattr(experts.backend, "grouped_linear",
                        lambda *a, **kw: seen.append(kw.get("pow2_input", False)) or original(*a, **kw))
    experts(torch.randn(6, cfg.hidden_size), torch.tensor([3, 3] + [0] * (cfg.n_routed_experts - 2)),
            torch.ones(6))
    assert seen == [True, False]  # gate_up input (the dispatched tokens): pow2; down_proj input: not


@pytest.mark.parametrize("where", ["input", "output gradient"])
def test_non_finite_input_or_gradient_raises_naming_tensor(where):
    backend = get_backend("fp8-emulated")
    block = torch.nn.Module()
    block.o_proj = Linear(64, 32, backend)
    torch.nn.init.normal_(block.o_proj.weight)
    name_linears(block)
    x = torch.randn(3, 64, requires_grad=True)
    g = torch.ones(3, 32)
    if where == "input":
        x = x.detach().clone()
        x[1, 5] = float("nan")
    else:
        g[0, 0] = float("inf")
    with pytest.raises(DataError, match=f"o_proj {where} has 1 non-finite"):
        block.o_proj(x).backward(g)


def test_telemetry_counts_underflow_saturation_and_samples_every_n_calls():
    backend = get_backend(PrecisionConfig(backend="fp8-emulated", telemetry_interval=2, amax_history_len=3))
    lin = Linear(256, 8, backend)
    torch.nn.init.normal_(lin.weight)
    x = torch.zeros(2, 256)
    x[0, 0], x[0, 1], x[0, 2] = 1.0, 1e-9, 1e-5  # one saturates (the amax), one underflows, one subnormal
    x[1, 130] = -3.0
    for i in range(5):
        lin((x * (i + 1)).requires_grad_()).sum().backward()
    stats = collect_telemetry(lin)["weight"]
    inp = stats["input"]
    assert inp["numel"] == 3 * x.numel()  # calls 1, 3, 5 sampled
    assert (inp["underflow"], inp["subnormal"], inp["saturated"], inp["tiles"]) == (3, 3, 6, 6)
    assert inp["amax_history"] == [3.0, 9.0, 15.0]
    assert stats["grad"]["numel"] == 3 * 16 and stats["weight"]["numel"] == 3 * lin.weight.numel()
    assert collect_telemetry(lin) == {}  # reset on collection


def test_tiny_model_fp8_emulated_close_to_bf16():
    cfg = ModelConfig.from_preset("tiny")
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=_gen(0))
    results = {}
    for backend in ("bf16", "fp8-emulated"):
        model = build_model(cfg, backend, seed=0)
        with model.backend.autocast("cpu"):
            out = model.compute_loss(tokens, tokens)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[backend] = (out.loss.item(), grads)
    (l16, g16), (l8, g8) = results["bf16"], results["fp8-emulated"]
    assert abs(l8 - l16) / l16 < 1e-3
    assert float(torch.nn.functional.cosine_similarity(g8, g16, dim=0)) > 0.99
    assert list(build_model(cfg, "fp8-emulated").state_dict()) == list(build_model(cfg, "bf16").state_dict())


_TRITON = moelib_cuda.triton_unavailable_reason()


@pytest.mark.skipif(_TRITON is not None, reason=f"Triton kernels cannot run here: {_TRITON}")
def test_triton_backend_matches_emulated_on_a_small_linear():
    """Quantisation is bit-identical; the GEMMs differ only in fp32 summation order (interpreter on CPU)."""
    device = "cpu" if moelib_cuda.interpreting() else "cuda"
    x, w, g = _spread((20, 130), 16), _spread((140, 130), 17) * 0.01, _spread((20, 140), 18)
    x, w, g = x.to(device), w.to(device), g.to(device)
    ref = _run(x, w, g, Fp8Options(EMULATED, pow2_input=True))
    got = _run(x, w, g, Fp8Options(triton_kernels(), pow2_input=True))
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_unavailable_backends_fail_at_start(monkeypatch):
    monkeypatch.setattr(moelib_cuda, "triton_unavailable_reason",
                        lambda: "Triton is not installed (pip install triton); use the fp8-emulated backend.")
    with pytest.raises(BackendUnavailableError, match=r"^PrecisionConfig.backend fp8-triton cannot run here: Triton "
                                                      r"is not installed .*fp8-emulated"):
        build_model(ModelConfig.from_preset("tiny"), "fp8-triton")
    from moelib.precision.te import te_unavailable_reason

    reason = te_unavailable_reason()
    if reason is None:
        pytest.skip("Transformer Engine runs here, so fp8-te is available")
    with pytest.raises(BackendUnavailableError, match="fp8-te cannot run here: .*use fp8-"):
        build_model(ModelConfig.from_preset("tiny"), "fp8-te")


@pytest.mark.parametrize("defer", [False, True])
def test_weight_grad_reaches_the_parameter_under_saved_tensor_hooks(defer):
    """Saved-tensor hooks (activation checkpointing, offloading) may hand backward a new tensor object for
    the saved weight: dW must still land on the parameter, immediate or deferred, dense or grouped."""
    w = torch.nn.Parameter(torch.randn(128, 256) * 0.05)
    we = torch.nn.Parameter(torch.randn(2, 128, 256) * 0.05)
    x = torch.randn(6, 256, requires_grad=True)
    WeightGradStore.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), lambda t: t):
        y = fp8_linear(x, w).sum() + fp8_grouped_linear(x, we, torch.tensor([2, 4])).sum()
    with WeightGradStore.deferred() if defer else contextlib.nullcontext():
        y.backward()
    WeightGradStore.pop_all()
    assert w.grad is not None and we.grad is not None
    assert w.grad.abs().sum() > 0 and we.grad.abs().sum() > 0
