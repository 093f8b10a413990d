"""AdamW with bf16 moments (TrainConfig.moment_dtype): against an fp64 AdamW that rounds its moments to
bf16 at the same point, memory, and state-dict round trips. ZeRO-1 with bf16 moments is compared with
this optimizer under mpirun (tests/distributed/test_mesh_and_sync.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib import TrainConfig
from moelib.precision import adamw
from moelib.train.optimizer import AdamW, build_optimizer

BETAS, EPS, WD = (0.9, 0.95), 1e-8, 0.1
BF16_ULP = 2.0 ** -7  # spacing of bf16 values in [1, 2): 8 significand bits


def reference(p0: torch.Tensor, grads: list[torch.Tensor], lrs: list[float], wd: float, round_bf16: bool):
    """AdamW in fp64. With ``round_bf16`` the moments are rounded to bf16 when stored, after the
    parameter update has used them, as moelib.precision.adamw.adamw_update_ documents. Returns p, m, v
    and the largest |m| and v each element reached (a flip's ulp is carried at the scale it happened at)."""
    p, m, v = p0.double(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    peak_m, peak_v = torch.zeros_like(m), torch.zeros_like(v)
    (b1, b2) = BETAS
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.double()
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr / (1 - b1 ** t) * m / (v.sqrt() / math.sqrt(1 - b2 ** t) + EPS)
        if round_bf16:
            m, v = m.to(torch.bfloat16).double(), v.to(torch.bfloat16).double()
        peak_m, peak_v = torch.maximum(peak_m, m.abs()), torch.maximum(peak_v, v)
    return p, m, v, peak_m, peak_v


def ulps(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|a − b| in units of the bf16 spacing at magnitude ``scale``."""
    spacing = torch.exp2(torch.floor(torch.log2(scale.abs().clamp(min=1e-38)))) * BF16_ULP
    return (a.double() - b.double()).abs() / spacing


def run_moelib(p0, grads, lrs, wd, moment_dtype):
    p = torch.nn.Parameter(p0.clone())
    opt = AdamW([p], lr=lrs[0], betas=BETAS, eps=EPS, weight_decay=wd, moment_dtype=moment_dtype)
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


def problem(shape, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(shape, generator=gen)
    # A drifting mean keeps m away from 0 (where relative errors mean little) and gives each element its
    # own scale, so the bf16 rounding happens at many exponents.
    scale = torch.exp(torch.randn(shape, generator=gen))
    drift = torch.randn(shape, generator=gen)
    grads = [(drift + 0.5 * torch.randn(shape, generator=gen)) * scale for _ in range(steps)]
    return p0, grads


@settings(max_examples=12, deadline=None)
@given(shape=st.sampled_from([(7,), (33, 5), (4, 3, 17), (256, 40)]), lr=st.floats(1e-4, 3e-2),
       steps=st.integers(2, 8), seed=st.integers(0, 2 ** 16))
def test_bf16_moments_follow_the_rounding_reference(shape, lr, steps, seed):
    """Stored moments are the fp64 reference's bf16 values, but for a rare one-ulp flip where fp32 and
    fp64 arithmetic land on two sides of a rounding boundary. Parameters match the rounding reference to
    fp32 rounding (typical element), and to a flipped moment's effect (worst element)."""
    p0, grads = problem(shape, steps, seed)
    lrs = [lr * (1 - 0.1 * i) for i in range(steps)]
    p, opt = run_moelib(p0, grads, lrs, WD, "bf16")
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg_sq"].dtype == torch.bfloat16
    ref_p, ref_m, ref_v, peak_m, peak_v = reference(p0, grads, lrs, WD, round_bf16=True)
    # Where m nearly cancels, fp32 arithmetic alone is off by more than an ulp of the small result.
    gmax = torch.stack(grads).abs().amax(0).double()
    for mine, ref, peak, cancel in ((state["exp_avg"], ref_m, peak_m, steps * 2.0 ** -23 * gmax),
                                    (state["exp_avg_sq"], ref_v, peak_v, 0)):
        off = ulps(mine, ref, peak)
        assert bool(((off <= 1) | ((mine.double() - ref).abs() <= cancel)).all()), float(off.max())
        assert int((off > 0).sum()) <= 2 + 2e-3 * off.numel()  # flips are rare
    err = (p.double() - ref_p).abs()
    fp32_noise = steps * 2.0 ** -22 * float(ref_p.abs().max())  # p rounded to fp32 after each op
    assert float(err.median()) <= fp32_noise
    assert float(err.max()) <= fp32_noise + steps * 2 * BF16_ULP * lr


def test_measured_errors_against_fp64(capsys):
    """The numbers quoted in the report: 8 steps of a 256x40 matrix at lr 1e-2."""
    p0, grads = problem((256, 40), 8, seed=5)
    lrs = [1e-2] * 8
    p, _ = run_moelib(p0, grads, lrs, WD, "bf16")
    p32, _ = run_moelib(p0, grads, lrs, WD, "fp32")
    ref_p, *_ = reference(p0, grads, lrs, WD, round_bf16=True)
    plain_p, *_ = reference(p0, grads, lrs, WD, round_bf16=False)
    bf16_vs_ref = float((p.double() - ref_p).abs().max() / 1e-2)
    bf16_vs_plain = float((p.double() - plain_p).abs().max() / 1e-2)
    fp32_vs_plain = float((p32.double() - plain_p).abs().max() / 1e-2)
    with capsys.disabled():
        print(f"\n[moments] max |p - ref|/lr: bf16 vs rounding fp64 ref {bf16_vs_ref:.2e}, bf16 vs fp64 AdamW "
              f"{bf16_vs_plain:.2e}, fp32 vs fp64 AdamW {fp32_vs_plain:.2e}")
    assert bf16_vs_ref < bf16_vs_plain / 10
    assert fp32_vs_plain < 1e-4


def test_first_step_equals_fp32_and_default_is_torch_fused():
    """Moments start at zero, so the first bf16 step is the fp32 one bit for bit (the update uses the
    unrounded moments). The default (fp32) optimizer is torch's fused AdamW, as before."""
    p0, grads = problem((64, 16), 1, seed=1)
    p16, _ = run_moelib(p0, grads, [1e-2], WD, torch.bfloat16)
    p32 = torch.nn.Parameter(p0.clone())
    ref = torch.optim.AdamW([p32], lr=1e-2, betas=BETAS, eps=EPS, weight_decay=WD)  # single-tensor path
    p32.grad = grads[0].clone()
    ref.step()
    assert torch.equal(p16, p32.detach())
    model = torch.nn.Linear(8, 4)
    opt = build_optimizer(model, TrainConfig())
    assert opt.moment_dtype == torch.float32 and opt.defaults["fused"]
    assert build_optimizer(model, TrainConfig(moment_dtype="bf16")).moment_dtype == torch.bfloat16


def test_moment_memory_halves():
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.LayerNorm(48), torch.nn.Linear(48, 8))
    numel = sum(p.numel() for p in model.parameters())
    sizes = {}
    for dtype in ("fp32", "bf16"):
        opt = build_optimizer(model, TrainConfig(moment_dtype=dtype))
        model(torch.randn(3, 32)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        sizes[dtype] = opt.state_bytes()
    assert sizes == {"fp32": 2 * 4 * numel, "bf16": 2 * 2 * numel}


def make(moment_dtype, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.LayerNorm(24), torch.nn.Linear(24, 4))
    return model, build_optimizer(model, TrainConfig(moment_dtype=moment_dtype, lr=1e-2))


def train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(5, 16, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_state_dict_round_trip_keeps_bf16():
    """Saved moments stay bf16; a resumed optimizer continues bit for bit."""
    model, opt = make("bf16")
    train(model, opt, 3, seed=1)
    sd = opt.state_dict()
    assert {s["exp_avg"].dtype for s in sd["state"].values()} == {torch.bfloat16}
    assert {s["exp_avg_sq"].dtype for s in sd["state"].values()} == {torch.bfloat16}
    model2, opt2 = make("bf16", seed=99)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    assert {s["exp_avg"].dtype for s in opt2.state.values()} == {torch.bfloat16}
    train(model, opt, 2, seed=2)
    train(model2, opt2, 2, seed=2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


@pytest.mark.parametrize("saved, loaded", [("fp32", "bf16"), ("bf16", "fp32")])
def test_loading_converts_the_moment_dtype(saved, loaded):
    model, opt = make(saved)
    train(model, opt, 2, seed=3)
    model2, opt2 = make(loaded)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(opt.state_dict())
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[loaded]
    for mine, theirs in zip(opt2.state.values(), opt.state.values()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert mine[key].dtype == want
            assert torch.equal(mine[key], theirs[key].to(want))  # fp32 -> bf16 rounds to nearest even
    train(model2, opt2, 1, seed=4)  # and it steps
    assert all(torch.isfinite(p).all() for p in model2.parameters())


@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
def test_update_in_cpu_pieces_equals_the_whole_tensor_update(moment_dtype):
    """adamw_update_ runs CPU_CHUNK elements at a time on CPU: bit for bit the whole-tensor update (what runs
    on a GPU, or for a non-contiguous tensor), and with fp32 moments torch's single-tensor AdamW, over a
    tensor of several pieces and a ragged last one, with and without the caller's scratch."""
    numel = 2 * adamw.CPU_CHUNK + 1234  # even, for the transposed view below
    p0, grads = problem((numel,), 3, seed=7)
    whole, pieces, scratched = p0.clone(), p0.clone(), p0.clone()
    moments = {name: [torch.zeros(numel, dtype=moment_dtype) for _ in range(2)] for name in ("whole", "pieces", "s")}
    scratch = adamw.adamw_scratch("cpu")

    def transposed(t):  # every element, not contiguous: the update runs whole
        return t.view(2, -1).t()

    assert not transposed(whole).is_contiguous()
    for t, g in enumerate(grads, start=1):
        args = (t, 1e-2, *BETAS, EPS, WD)
        adamw.adamw_update_(transposed(whole), transposed(g), *map(transposed, moments["whole"]), *args)
        adamw.adamw_update_(pieces, g, *moments["pieces"], *args)
        adamw.adamw_update_(scratched, g, *moments["s"], *args, scratch)
    for other in ("pieces", "s"):
        for a, b in zip(moments["whole"], moments[other]):
            assert torch.equal(a, b)
    assert torch.equal(whole, pieces) and torch.equal(whole, scratched)
    if moment_dtype == torch.float32:
        ref = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([ref], lr=1e-2, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
        for g in grads:
            ref.grad = g.clone()
            opt.step()
        assert torch.equal(pieces, ref.detach())
