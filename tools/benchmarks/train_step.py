"""Training-step throughput of moelib vs transformers' DeepseekV3ForCausalLM on the same config, batch and dtype.

Both models get the same weights (moelib's, written in the released layout and loaded by
transformers), the same AdamW, and the same mixed-precision policy: fp32 weights, with bf16 compute
under autocast for ``--dtype bf16``. Every step takes a new batch, as training does (a repeated batch
repeats the routing, and so the expert GEMM shapes the CPU libraries cache); step i of both models sees
the same batch. Steps alternate between the two models so that drift on a shared machine hits both
alike. Also reported: model FLOP/s as a fraction of this machine's dense matmul rate, measured in the
same run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from moelib import ModelConfig, TrainConfig
from moelib.model import build_model
from moelib.precision import weight_cache
from moelib.precision.weight_grad import fresh_grads
from moelib.train.hf_format import to_hf_config, to_hf_state_dict
from moelib.train.metrics import measure_matmul_flops, model_flops_per_token
from moelib.train.optimizer import build_optimizer


def add_args(p) -> None:
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vs-hf", action="store_true", help="also time transformers' DeepseekV3ForCausalLM")
    p.add_argument("--moments", choices=("fp32", "bf16"), default="fp32",
                   help="moelib's AdamW moment storage (V3: bf16); transformers keeps torch's fused fp32 AdamW")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more steps of each model and print where the time goes")


def variant(args) -> str:
    return f"{args.preset}-{args.dtype}" + ("-bf16-moments" if args.moments == "bf16" else "")


def hf_model(model, cfg: ModelConfig):
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        tensors = {k: v.contiguous().clone() for k, v in to_hf_state_dict(model.state_dict(), cfg)}
        save_file(tensors, str(Path(d) / "model.safetensors"), metadata={"format": "pt"})
        (Path(d) / "config.json").write_text(json.dumps(to_hf_config(cfg, "float32")))
        return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).train()


def profile_steps(step, batches, top: int = 12) -> list[dict]:
    """The ``top`` operators by self CPU time over a step on each batch: share of the total, ms and calls
    per step."""
    from torch.profiler import ProfilerActivity, profile

    n = len(batches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for tokens in batches:
            step(tokens)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "ms_per_step": e.self_cpu_time_total / 1e3 / n,
             "calls_per_step": e.count / n} for e in ranked]


def run(args) -> dict:
    cfg = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    ours = build_model(cfg, "fp32", seed=0).train()
    candidates = {"moelib": ours}
    if args.vs_hf:
        candidates["transformers"] = hf_model(ours, cfg)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext
    n_batches = args.warmup + args.steps + args.profile
    batches = torch.randint(0, cfg.vocab_size, (n_batches, args.batch, args.seq + 1),
                            generator=torch.Generator().manual_seed(0))
    # moelib's own optimizer; for transformers the fused AdamW its Trainer picks by default (torch >= 2.8).
    optims = {"moelib": build_optimizer(ours, TrainConfig(lr=1e-4, min_lr=1e-5, moment_dtype=args.moments))}
    if args.vs_hf:
        optims["transformers"] = torch.optim.AdamW(candidates["transformers"].parameters(), lr=1e-4,
                                                   betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    @contextlib.contextmanager
    def moelib_step():
        with weight_cache.reuse(), fresh_grads(ours.parameters()):
            yield

    def step(name: str, tokens: torch.Tensor) -> float:
        model, opt = candidates[name], optims[name]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        start = time.perf_counter()
        # Each as its own trainer runs a step: moelib's Trainer keeps the gradient buffers and starts them from
        # zero without a zeroing pass (fresh_grads), and its step scope (weight_cache.reuse) keeps the memory
        # of the weights' bf16 casts and the logits for the next step; transformers' Trainer frees the
        # gradients after a step.
        with moelib_step() if name == "moelib" else contextlib.nullcontext():
            with autocast():
                if name == "moelib":
                    # The main-model loss only, as transformers computes it (MTP off for a like-for-like step).
                    loss = model.compute_loss(inputs, labels, mtp_weight=0.0).lm_loss
                else:
                    loss = model(inputs, labels=tokens[:, :-1].contiguous(),
                                 shift_labels=labels.contiguous()).loss
            loss.backward()
        opt.step()
        if name != "moelib":
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {k: [] for k in candidates}
    for i in range(args.warmup + args.steps):
        for name in candidates:
            t = step(name, batches[i])
            if i >= args.warmup:
                times[name].append(t)
    ntok = args.batch * args.seq
    mm_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    peak = measure_matmul_flops(mm_dtype)
    flops = model_flops_per_token(cfg, args.seq, with_mtp=False)
    result = {"preset": args.preset, "dtype": args.dtype, "moelib_moments": args.moments, "batch": args.batch,
              "seq": args.seq, "matmul_gflops": peak / 1e9, "models": {}}
    print(f"train-step  preset={args.preset} dtype={args.dtype} moelib moments={args.moments} "
          f"batch={args.batch}x{args.seq}  "
          f"matmul {peak / 1e9:.0f} GFLOP/s")
    print(f"{'model':<14}{'tokens/s':>12}{'step ms':>10}{'GFLOP/s':>10}{'of matmul':>11}")
    for name, ts in times.items():
        t = statistics.median(ts)
        tps = ntok / t
        result["models"][name] = {"tokens_per_s": tps, "step_s": t, "steps_s": ts,
                                  "gflops": tps * flops / 1e9, "fraction_of_matmul": tps * flops / peak}
        print(f"{name:<14}{tps:>12.0f}{t * 1e3:>10.0f}{tps * flops / 1e9:>10.1f}{tps * flops / peak:>11.1%}")
    if "transformers" in times:
        ratio = result["models"]["moelib"]["tokens_per_s"] / result["models"]["transformers"]["tokens_per_s"]
        result["ratio_moelib_over_transformers"] = ratio
        # Each step of one model beside the other's on the same batch, seconds apart: the ratio within each
        # pair cancels the drift of a shared machine over a run, which the ratio of medians does not.
        paired = [t_hf / t_ours for t_ours, t_hf in zip(times["moelib"], times["transformers"])]
        result["paired_ratios"] = paired
        result["paired_ratio_median"] = statistics.median(paired)
        print(f"moelib / transformers: {ratio:.2f}x  (median of the {len(paired)} per-step pairs: "
              f"{statistics.median(paired):.2f}x, range {min(paired):.2f}-{max(paired):.2f})")
    if args.profile:
        result["profile"] = {}
        for name in candidates:
            rows = result["profile"][name] = profile_steps(functools.partial(step, name),
                                                           batches[args.warmup + args.steps:])
            print(f"\n{name}: top operators by self CPU time over {args.profile} profiled steps")
            print(f"{'operator':<58}{'share':>8}{'ms/step':>9}{'calls/step':>12}")
            for r in rows:
                print(f"{r['op'][:57]:<58}{r['share']:>8.1%}{r['ms_per_step']:>9.1f}{r['calls_per_step']:>12.0f}")
    return result
