"""Plan a training run at cluster scale: memory per GPU, step time, bubble, exposed all-to-all, GPU-hours.

    python tools/plan.py --config v3-671b --gpus 2048 --gpu h800 --pp 16 --ep 64 --schedule dualpipe \\
        --precision fp8 --seq-length 4096 --global-batch-size 15360 --micro-batch-size 1 --tokens 14.8T
    python tools/plan.py --config v2-lite-16b --gpus 8 --gpu h100 --global-batch-size 64 --search

The memory table comes from the real model (moelib.plan.memory; activation bytes measured on CPU proxies
of the real layers: a minute or two for V3 on a busy 2-core machine, then cached); the step time plays
the schedule's per-rank programs through moelib's event simulator with chunk times from exact FLOPs at
--efficiency of the dense peak of the precision (0.3 by default: a little under the 0.335 that V3's own
180K H800 GPU-hours per trillion tokens imply under this model, see BENCHMARKS.md; or the GEMM rates a
GPU's `bench.py kernels` JSON measured, with --kernels) on the SMs the all-to-all leaves, all-to-all times
from the hardware's bandwidths, and after the pipeline the gradient sync, ZeRO all-gather and AdamW step
(moelib.plan.update).
Activation bytes are measured once per model and moelib version and cached in $MOELIB_CACHE_DIR
(default ~/.cache/moelib).
--target-gpu-hours solves for the efficiency that takes that many GPU-hours per trillion tokens
(V3: 180000), which prints the MFU such a figure implies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelib.config import ModelConfig, RecipeConfig  # noqa: E402
from moelib.errors import ConfigError  # noqa: E402
from moelib.parallel.report import run_main  # noqa: E402
from moelib.plan.hardware import PRESETS, efficiency_from_kernels, hardware  # noqa: E402
from moelib.plan.memory import ROWS  # noqa: E402
from moelib.plan.planner import (  # noqa: E402
    DEFAULT_EFFICIENCY,
    SCHEDULES,
    Plan,
    PlanInputs,
    efficiency_for_gpu_hours,
    make_plan,
    overflow,
    search,
)

GiB = 2**30


def parse_tokens(text: str) -> float:
    """'14.8T' -> 1.48e13 (K, M, B or G, T; decimal)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([KMBGT]?)\s*", text, re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(f"--tokens: {text!r} is not a positive token count such as 14.8T or 500B")
    unit = m.group(2).upper().replace("G", "B")
    return float(m.group(1)) * 1000 ** " KMBT".index(unit or " ")


def load_model(spec: str) -> ModelConfig:
    """A ModelConfig preset name, or a recipe YAML whose model section is used."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"--config: {spec} does not exist")
        return RecipeConfig.from_yaml(path).model
    try:
        return ModelConfig.from_preset(spec)
    except ConfigError:
        raise ConfigError(f"--config: {spec!r} is neither a model preset nor a recipe .yaml file") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="model preset (tiny, small, v2-lite-16b, v3-671b) or recipe YAML")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu", default="h800", help=f"hardware preset: {', '.join(PRESETS)}")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--schedule", default="dualpipe", choices=SCHEDULES)
    p.add_argument("--precision", default="fp8", choices=("bf16", "fp8"))
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--global-batch-size", type=int, default=15360, help="sequences per step")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--tokens", default="1T", help="tokens to train, e.g. 14.8T (default 1T)")
    p.add_argument("--efficiency", type=float, default=DEFAULT_EFFICIENCY,
                   help=f"achieved fraction of the dense peak (default {DEFAULT_EFFICIENCY})")
    p.add_argument("--kernels", default=None,
                   help="a bench.py kernels JSON from the GPU: its measured GEMM rates replace --efficiency")
    p.add_argument("--target-gpu-hours", type=float, default=None,
                   help="GPU-hours per trillion tokens to solve the efficiency for (V3: 180000)")
    p.add_argument("--recompute", default="selective", choices=("none", "selective", "full"))
    p.add_argument("--max-nodes-per-token", type=int, default=4, help="node-limited routing M (0: no limit)")
    p.add_argument("--moment-dtype", default="bf16", choices=("bf16", "fp32"), help="AdamW moments (V3: bf16)")
    p.add_argument("--usable-memory", type=float, default=0.9, help="share of HBM a run may fill")
    p.add_argument("--activation-seq", type=int, default=128, help="sequence length of the CPU activation measurement")
    hw = p.add_argument_group("hardware overrides (per GPU)")
    for flag, what in (("bf16-tflops", "dense bf16 peak"), ("fp8-tflops", "dense FP8 peak"), ("hbm-gb", "HBM GiB"),
                       ("nvlink-gbps", "NVLink GB/s"), ("network-gbps", "cross-node GB/s"),
                       ("hbm-tbps", "HBM TB/s (the optimizer step)")):
        hw.add_argument(f"--{flag}", type=float, default=None, help=what)
    hw.add_argument("--gpus-per-node", type=int, default=None)
    hw.add_argument("--sms", type=int, default=None, help="streaming multiprocessors per GPU")
    hw.add_argument("--comm-sms", type=int, default=None,
                    help="SMs the expert all-to-all keeps from compute (DeepEP in V3: 20)")
    p.add_argument("--search", action="store_true", help="try every layout for --gpus and rank those that fit")
    p.add_argument("--top", type=int, default=5, help="--search: how many fitting layouts to print")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the tables")
    return p


def inputs_from(args) -> PlanInputs:
    hw = hardware(args.gpu, bf16_tflops=args.bf16_tflops, fp8_tflops=args.fp8_tflops, hbm_gb=args.hbm_gb,
                  nvlink_gbps=args.nvlink_gbps, network_gbps=args.network_gbps, gpus_per_node=args.gpus_per_node,
                  hbm_tbps=args.hbm_tbps, sms=args.sms, comm_sms=args.comm_sms)
    if not 0 < args.usable_memory <= 1:
        raise ConfigError(f"--usable-memory: must lie in (0, 1], got {args.usable_memory}")
    for flag in ("seq_length", "global_batch_size", "micro_batch_size", "activation_seq"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be positive, got {getattr(args, flag)}")
    efficiency = args.efficiency if args.kernels is None else efficiency_from_kernels(args.kernels, hw, args.precision)
    return PlanInputs(load_model(args.config), hw, args.gpus, args.pp, args.ep, args.schedule, args.precision,
                      args.seq_length, args.global_batch_size, args.micro_batch_size, parse_tokens(args.tokens),
                      efficiency, args.recompute, args.max_nodes_per_token or None,
                      2 if args.moment_dtype == "bf16" else 4, args.usable_memory, args.activation_seq)


def describe(plan: Plan) -> str:
    i, m, j = plan.inputs, plan.memory, plan.to_json()
    lines = [f"{i.gpus} x {i.hw.name}: PP {i.pp} x DP {i.dp} (EP {i.ep}), {i.schedule}, {i.microbatches} micro-batches "
             f"of {i.micro_batch_size} x {i.seq_length} per DP rank, {i.precision}",
             f"memory per GPU (pipeline rank {m.rank}, the fullest):"]
    for row in ROWS:
        lines.append(f"  {row:<16} {m.rows[row] / GiB:8.2f} GiB")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"  {'total':<16} {m.total / GiB:8.2f} GiB  {verdict} in {j['memory_limit_bytes'] / GiB:.1f} GiB "
                 f"({i.usable_memory:.0%} of {i.hw.hbm_gb:g})")
    lines.append(f"  activations are {m.activation_microbatches} micro-batches in flight; EMA on the host "
                 f"{m.ema_host_bytes / GiB:.2f} GiB")
    ctc, u = plan.compute_to_comm, plan.update
    share = f"{i.hw.sms - i.hw.comm_sms}/{i.hw.sms} SMs" if i.ep > 1 else "all SMs"
    lines += [
        f"step {plan.step_time_s:.3f} s at efficiency {i.efficiency:.3f} of the dense peak on {share}: pipeline "
        f"{plan.time.step_time_s:.3f} s, then gradient sync {u.gradient_sync:.3f} s, ZeRO all-gather "
        f"{u.param_gather:.3f} s, AdamW {u.optimizer:.3f} s",
        f"bubble {plan.time.bubble_fraction:.1%} of the pipeline (the idlest rank {j['max_rank_idle_s']:.3f} s; "
        f"Table 2's formula with the costliest stage's chunks {plan.table2_bubble_s:.3f} s), exposed all-to-all "
        f"{plan.time.exposed_comm_fraction:.1%} ({'hidden' if plan.comm_hidden else 'NOT hidden'})",
        "chunk forward compute (attention + MLP) : dispatch + combine = "
        + ("n/a (no EP)" if ctc is None else f"{ctc:.2f} : 1, 1 : 1 at efficiency {plan.one_to_one_efficiency:.3f}")
        + f" (network {plan.network_share:.0%} of the all-to-all time)",
        f"{plan.tokens_per_s:,.0f} tokens/s, MFU {plan.mfu:.1%} of bf16 peak, "
        f"{plan.gpu_hours:,.0f} GPU-hours for {i.tokens:.4g} tokens "
        f"({plan.gpu_hours / i.tokens * 1e12:,.0f} per trillion)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    inputs = inputs_from(args)
    if args.search:
        found = search(inputs)
        fitting = [c for c in found if c.reason is None]
        if args.json:
            print(json.dumps({"fitting": [c.plan.to_json() for c in fitting[: args.top]],
                              "rejected": [{"pp": c.inputs.pp, "ep": c.inputs.ep, "schedule": c.inputs.schedule,
                                            "reason": c.reason} for c in found if c.reason is not None]}, indent=1))
        else:
            print(f"{len(fitting)} of {len(found)} layouts fit; the fastest {min(args.top, len(fitting))}:")
            for c in fitting[: args.top]:
                p = c.plan
                print(f"  PP {c.inputs.pp:>3} EP {c.inputs.ep:>4} {c.inputs.schedule:<9} "
                      f"step {p.step_time_s:8.3f} s  bubble {p.time.bubble_fraction:5.1%}  "
                      f"exposed comm {p.time.exposed_comm_fraction:5.1%}  "
                      f"memory {p.memory.total / GiB:6.1f} GiB  MFU {p.mfu:5.1%}")
            print("not chosen:")
            for c in found:
                if c.reason is not None:
                    print(f"  PP {c.inputs.pp:>3} EP {c.inputs.ep:>4} {c.inputs.schedule:<9} {c.reason}")
        if not fitting:
            raise ConfigError(f"--gpus: no layout of {args.config} fits in {inputs.gpus} x {inputs.hw.name}")
        return 0
    plan = make_plan(inputs)
    out = plan.to_json()
    if args.target_gpu_hours is not None:
        per_trillion = dataclasses.replace(inputs, tokens=1e12)
        eff = efficiency_for_gpu_hours(per_trillion, args.target_gpu_hours)
        implied = make_plan(dataclasses.replace(inputs, efficiency=eff))
        out["implied"] = {"target_gpu_hours_per_trillion": args.target_gpu_hours, "efficiency": eff,
                          "mfu": implied.mfu, "gpu_hours": implied.gpu_hours,
                          "step_time_s": implied.step_time_s, "compute_to_comm": implied.compute_to_comm,
                          "exposed_comm_fraction": implied.time.exposed_comm_fraction,
                          "bubble_fraction": implied.time.bubble_fraction}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(describe(plan))
        if args.target_gpu_hours is not None:
            print(f"\n{args.target_gpu_hours:,.0f} GPU-hours per trillion tokens needs efficiency "
                  f"{out['implied']['efficiency']:.3f} (MFU {out['implied']['mfu']:.1%} of bf16 peak):")
            print(describe(implied))
    if not plan.fits:
        raise ConfigError(f"memory: the layout {overflow(plan.memory, out['memory_limit_bytes'])} on {inputs.hw.name}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "plan"))
