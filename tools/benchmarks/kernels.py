"""GPU kernels: FP8 quantisation GB/s vs copy, FP8 block GEMM / grouped GEMM TFLOP/s vs torch bf16, _scaled_mm, TE.

One prepared script for a short GPU window (a few minutes on an H200; it installs nothing):

* quantisation (moelib_cuda.quant.quantize, 1x128 and 128x128) in GB/s of traffic (bf16 read + fp8 and
  fp32 scales written) against a device-to-device copy moving the same number of bytes, timed alike.
  Target: >= 70 % of copy bandwidth. The public function is timed, including its finiteness check.
* FP8 block-scaled GEMM (moelib_cuda.gemm.fp8_gemm: A 1x128 tiles, B 128x128 blocks, bf16 out) on V3's
  shapes at M = 4096 tokens against torch bf16 matmul, torch._scaled_mm with one scale per tensor (the
  peer V3's recipe refines) and Transformer Engine's Linear forward under FP8 when it imports (that one
  also quantises its input, so it is an upper bound on TE's GEMM time). Each of the kernel's tile configs
  in TILES is timed; the library default (the first) and the best are reported. Target: >= 1.5x bf16.
* FP8 grouped GEMM (routed experts, one launch over all groups) against torch's bf16 grouped_mm.

Before timing, each kernel's output is checked against moelib.precision.fp8's emulated reference
(quantisation bit for bit; GEMMs by DeepGEMM's measure 1 - 2 sum(xy) / sum(x^2 + y^2) < 1e-5: they differ
only in fp32 summation order). GPU times: torch.cuda.Event around ``--iters`` calls after ``--warmup``.

Without CUDA this refuses, unless ``--smoke``: the same code at tiny shapes, on CPU through Triton's
interpreter (TRITON_INTERPRET=1), to prove the script before GPU time is spent on it.
"""

from __future__ import annotations

import os
import time

import torch
from tqdm import tqdm

from moelib.errors import BackendUnavailableError

# (name, N, K) of V3's Linears at hidden 7168 (REFERENCE §1); DeepGEMM benchmarks the same set.
GEMM_SHAPES = (
    ("q_a+kv_a (fused down-proj)", 1536 + 576, 7168),
    ("q_b", 128 * (128 + 64), 1536),
    ("kv_b", 128 * (128 + 128), 512),
    ("o_proj", 7168, 128 * 128),
    ("expert gate+up", 2 * 2048, 7168),
    ("expert down", 7168, 2048),
)
GROUPED_SHAPES = (("experts gate+up", 2 * 2048, 7168), ("experts down", 7168, 2048))  # 8 experts x M rows
QUANT_SHAPES = (("1x128", (1, 128), (4096, 7168)), ("1x128", (1, 128), (4096, 2048)),
                ("128x128", (128, 128), (7168, 2048)), ("128x128", (128, 128), (24576, 1536)))
TILES = ((64, 128), (128, 128), (128, 256))  # (block_m, block_n); the first is the library's default
SMOKE = {"m": 128, "experts": 2, "gemm": (("smoke", 256, 384),), "quant": (("1x128", (1, 128), (96, 256)),
         ("128x128", (128, 128), (160, 256))), "tiles": ((64, 128),)}
TARGET_GEMM, TARGET_QUANT, TOL = 1.5, 0.70, 1e-5


def add_args(p) -> None:
    p.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU via TRITON_INTERPRET=1 without a GPU")
    p.add_argument("--m", type=int, default=4096, help="tokens (rows of A); per expert for the grouped GEMM")
    p.add_argument("--experts", type=int, default=8, help="groups of the grouped GEMM")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)


def variant(args) -> str:
    return "smoke" if args.smoke else ""


def timer(device: str, warmup: int, iters: int):
    """Seconds per call of fn: CUDA events on a GPU, wall clock in the interpreter."""
    def measure(fn) -> float:
        for _ in range(warmup):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters
    return measure


def diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def try_peer(fn):
    """A peer's timing, or the sentence saying why it could not run here."""
    try:
        return fn()
    except Exception as exc:  # peers are optional: report, don't abort the GPU window
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def per_tensor_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.abs().amax().float() / 448.0).clamp(min=1e-12)
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def te_linear_time(measure, x: torch.Tensor, n: int):
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe

    make = getattr(recipe, "Float8BlockScaling", None) or recipe.DelayedScaling
    layer = te.Linear(x.shape[1], n, bias=False, params_dtype=torch.bfloat16, device=x.device)
    with torch.no_grad(), te.fp8_autocast(enabled=True, fp8_recipe=make()):
        return {"s": measure(lambda: layer(x)), "recipe": make.__name__}


def bench_quant(shapes, device, measure, quant, ref) -> list[dict]:
    rows = []
    for name, block, (r, c) in tqdm(shapes, desc="quantise", leave=False):
        x = torch.randn(r, c, device=device, dtype=torch.bfloat16)
        data, scale = quant.quantize(x, block)
        want = ref.quantize(x, block)
        exact = torch.equal(data.view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(scale, want[1])
        traffic = x.numel() * x.element_size() + data.numel() + scale.numel() * 4
        src = torch.empty(traffic // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        t_quant = measure(lambda x=x, block=block: quant.quantize(x, block))
        t_copy = measure(lambda src=src, dst=dst: dst.copy_(src))
        rows.append({"block": name, "shape": [r, c], "bit_exact": exact, "quant_gbps": traffic / t_quant / 1e9,
                     "copy_gbps": 2 * src.numel() / t_copy / 1e9, "fraction_of_copy": t_copy / t_quant})
    return rows


def gemm_case(name, m, n, k, tiles, device, measure, gemm, quant, ref) -> dict:
    a, b = torch.randn(m, k, device=device, dtype=torch.bfloat16), torch.randn(n, k, device=device,
                                                                                dtype=torch.bfloat16)
    (a8, sa), (b8, sb) = quant.quantize(a, (1, 128)), quant.quantize(b, (128, 128))
    want = ref.fp8_gemm(a8, sa, b8, sb)
    flops = 2 * m * n * k
    row = {"name": name, "m": m, "n": n, "k": k, "tiles": {}}
    for bm, bn in tiles:
        def call(bm=bm, bn=bn):
            return gemm.fp8_gemm(a8, sa, b8, sb, block_m=bm, block_n=bn)
        row["tiles"][f"{bm}x{bn}"] = {"diff_vs_reference": diff(call(), want), "tflops": flops / measure(call) / 1e12}
    row["correct"] = all(v["diff_vs_reference"] < TOL for v in row["tiles"].values())
    row["diff_vs_bf16"] = diff(want, a @ b.t())
    row["bf16_tflops"] = flops / measure(lambda: a @ b.t()) / 1e12
    (pa, spa), (pb, spb) = per_tensor_fp8(a), per_tensor_fp8(b)
    row["scaled_mm_per_tensor_tflops"] = try_peer(
        lambda: flops / measure(lambda: torch._scaled_mm(pa, pb.t(), spa, spb, out_dtype=torch.bfloat16)) / 1e12)
    te = try_peer(lambda: te_linear_time(measure, a, n))
    row["te_linear_fwd_tflops"] = flops / te["s"] / 1e12 if isinstance(te, dict) else te
    return summarise(row)


def grouped_case(name, m, experts, n, k, tiles, device, measure, gemm, quant, ref) -> dict:
    import torch.nn.functional as F

    a = torch.randn(m * experts, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(experts, n, k, device=device, dtype=torch.bfloat16)
    counts = torch.full((experts,), m, dtype=torch.int64)
    a8, sa = quant.quantize(a, (1, 128))
    per_expert = [quant.quantize(b[e], (128, 128)) for e in range(experts)]
    b8, sb = torch.stack([d for d, _ in per_expert]), torch.stack([s for _, s in per_expert])
    want = ref.fp8_grouped_gemm(a8, sa, b8, sb, counts)
    flops = 2 * m * experts * n * k
    row = {"name": name, "experts": experts, "m_per_expert": m, "n": n, "k": k, "tiles": {}}
    on_device = counts.to(device)  # host counts would be checked, i.e. a device sync per call
    for bm, bn in tiles:
        def call(bm=bm, bn=bn):
            return gemm.fp8_grouped_gemm(a8, sa, b8, sb, on_device, block_m=bm, block_n=bn)
        row["tiles"][f"{bm}x{bn}"] = {"diff_vs_reference": diff(call(), want), "tflops": flops / measure(call) / 1e12}
    row["correct"] = all(v["diff_vs_reference"] < TOL for v in row["tiles"].values())
    offs = torch.cumsum(counts, 0).to(device=device, dtype=torch.int32)
    bt = b.transpose(-2, -1)
    row["bf16_tflops"] = try_peer(lambda: flops / measure(lambda: F.grouped_mm(a, bt, offs=offs)) / 1e12)
    return summarise(row)


def summarise(row: dict) -> dict:
    best = max(row["tiles"], key=lambda t: row["tiles"][t]["tflops"])
    row["best_tile"], row["tflops"] = best, row["tiles"][best]["tflops"]
    row["default_tflops"] = next(iter(row["tiles"].values()))["tflops"]
    bf16 = row["bf16_tflops"]
    row["speedup_vs_bf16"] = row["tflops"] / bf16 if isinstance(bf16, float) else None
    return row


def run(args) -> dict:
    if not torch.cuda.is_available():
        if not args.smoke:
            raise BackendUnavailableError("bench.py kernels times GPU kernels and there is no CUDA GPU here "
                                          "(use --smoke to check the script on CPU at tiny shapes).")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import moelib_cuda

    reason = moelib_cuda.triton_unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"bench.py kernels needs Triton: {reason}")
    from moelib.precision import fp8 as ref
    from moelib_cuda import gemm, quant

    device = "cpu" if moelib_cuda.interpreting() else "cuda"
    if args.smoke:
        m, experts, gemm_shapes, quant_shapes, tiles = (SMOKE["m"], SMOKE["experts"], SMOKE["gemm"],
                                                        SMOKE["quant"], SMOKE["tiles"])
        grouped_shapes, warmup, iters = SMOKE["gemm"], 1, 1
    else:
        m, experts, gemm_shapes, quant_shapes, tiles = args.m, args.experts, GEMM_SHAPES, QUANT_SHAPES, TILES
        grouped_shapes, warmup, iters = GROUPED_SHAPES, args.warmup, args.iters
    torch.manual_seed(0)
    measure = timer(device, warmup, iters)
    result = {"device": device, "smoke": args.smoke, "interpreted": moelib_cuda.interpreting(),
              "quant": bench_quant(quant_shapes, device, measure, quant, ref),
              "gemm": [gemm_case(name, m, n, k, tiles, device, measure, gemm, quant, ref)
                       for name, n, k in tqdm(gemm_shapes, desc="gemm", leave=False)],
              "grouped_gemm": [grouped_case(name, m, experts, n, k, tiles, device, measure, gemm, quant, ref)
                               for name, n, k in tqdm(grouped_shapes, desc="grouped", leave=False)]}
    report(result)
    return result


def report(r: dict) -> None:
    print(f"quantisation ({r['device']}{', interpreted' if r['interpreted'] else ''})")
    print(f"{'block':<8} {'shape':<13} {'exact':>5} {'GB/s':>8} {'copy GB/s':>10} {'of copy':>8}")
    for q in r["quant"]:
        print(f"{q['block']:<8} {'x'.join(map(str, q['shape'])):<13} {str(q['bit_exact']):>5} {q['quant_gbps']:8.4g} "
              f"{q['copy_gbps']:10.4g} {q['fraction_of_copy']:8.1%}")
    fmt = lambda v: f"{v:8.4g}" if isinstance(v, float) else f"{'n/a':>8}"  # noqa: E731
    for kind in ("gemm", "grouped_gemm"):
        print(f"\n{kind} TFLOP/s (best tile; default tile; torch bf16; _scaled_mm per-tensor; TE Linear fwd)")
        print(f"{'shape':<28} {'MxNxK':<18} {'ok':>5} {'best':>8} {'default':>8} {'bf16':>8} {'scaled':>8} "
              f"{'TE':>8} {'vs bf16':>8}")
        for g in r[kind]:
            mnk = f"{g.get('m', g.get('m_per_expert'))}x{g['n']}x{g['k']}"
            vs = f"{g['speedup_vs_bf16']:7.2f}x" if g["speedup_vs_bf16"] else f"{'n/a':>8}"
            print(f"{g['name']:<28} {mnk:<18} {str(g['correct']):>5} {fmt(g['tflops'])} {fmt(g['default_tflops'])} "
                  f"{fmt(g['bf16_tflops'])} {fmt(g.get('scaled_mm_per_tensor_tflops'))} "
                  f"{fmt(g.get('te_linear_fwd_tflops'))} {vs}")
    ok = all(g["correct"] for g in r["gemm"] + r["grouped_gemm"]) and all(q["bit_exact"] for q in r["quant"])
    gemm_met = all((g["speedup_vs_bf16"] or 0) >= TARGET_GEMM for g in r["gemm"])
    quant_met = all(q["fraction_of_copy"] >= TARGET_QUANT for q in r["quant"])
    r["targets"] = {"all_correct": ok, "gemm_vs_bf16": TARGET_GEMM, "gemm_met": gemm_met,
                    "quant_of_copy": TARGET_QUANT, "quant_met": quant_met}
    print(f"\ncorrect: {ok}; FP8 GEMM >= {TARGET_GEMM}x bf16 on every shape: {gemm_met}; "
          f"quantisation >= {TARGET_QUANT:.0%} of copy: {quant_met}" + (" (smoke: times meaningless)"
                                                                           if r["smoke"] else ""))
