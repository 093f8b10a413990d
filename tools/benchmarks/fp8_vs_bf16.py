"""Train the same model on the same data with bf16 and fp8-emulated; report the relative loss difference.

For each seed both runs start from the same weights and see the same batches in the same order; their steps
alternate, so the step-time ratio is measured under the same machine load. Per seed the final loss is the mean
LM loss of the last ``--last`` steps, and the paired difference is (fp8 - bf16) / bf16. Small models trained on
small batches drift apart chaotically from rounding-level differences, so one seed cannot tell an FP8 defect from
that drift: ``--seeds`` repeats the pair and reports the mean paired difference with its standard error, and
``--control fp32`` adds a third run per seed whose gap to bf16 is the noise floor of two high-precision runs.
DeepSeek-V3 reports < 0.25 % over a whole run. FP8 telemetry is pooled over the runs (sampled every
``--telemetry-interval`` steps). A PNG of the loss curves is written next to the JSON result. ``--jobs 2``
trains two seeds at a time (one thread each on 2 cores); finished seeds are kept in ``<out>.partial.json``
until the run ends.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from benchmarks import add_jobs_arg, map_jobs, result_path, write_partial
from moelib import ModelConfig, TrainConfig
from moelib.precision.telemetry import collect_telemetry
from moelib.train.data import BatchLoader, default_dataset
from moelib.train.trainer import Trainer

BACKENDS = ("bf16", "fp8-emulated")
COLORS = {"bf16": "tab:blue", "fp8-emulated": "tab:orange", "fp32": "tab:green"}


def add_args(p) -> None:
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=300, help="~4 min per seed for tiny on 2 CPU cores")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[1234], help="one bf16/fp8 pair per seed")
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--control", choices=("none", "fp32"), default="none",
                   help="also train fp32 and report its gap to bf16: the noise floor of this comparison")
    p.add_argument("--last", type=int, default=50, help="steps averaged for the final loss")
    p.add_argument("--telemetry-interval", type=int, default=25)
    p.add_argument("--log-interval", type=int, default=25)
    add_jobs_arg(p, "seeds")


def loader(cfg: ModelConfig, args, seed: int) -> BatchLoader:
    return BatchLoader(default_dataset(cfg.vocab_size, args.seq), args.batch, seed=seed)


def pooled_telemetry(stats: dict, totals: dict) -> None:
    for per_weight in stats.values():
        for kind, c in per_weight.items():
            t = totals.setdefault(kind, dict.fromkeys(("numel", "underflow", "subnormal", "saturated", "tiles"), 0))
            for key in t:
                t[key] += c[key]


def train_pair(cfg: ModelConfig, args, seed: int, backends: tuple[str, ...]):
    """Train one run per backend from the same initial weights and data; returns (losses, seconds) per backend
    and the FP8 telemetry pooled over the run."""
    trainers, loaders, losses, seconds, telemetry = {}, {}, {}, {}, {}
    for name in backends:
        torch.manual_seed(seed)
        precision = {"backend": name, "telemetry_interval": args.telemetry_interval if "fp8" in name else 0}
        tc = TrainConfig(micro_batch_size=args.batch, seq_length=args.seq, train_iters=args.steps, seed=seed,
                         lr=args.lr, min_lr=min(args.lr, TrainConfig.min_lr), precision=precision)
        trainers[name], loaders[name] = Trainer(cfg, tc), loader(cfg, args, seed)
        losses[name], seconds[name] = [], 0.0
    for step in range(1, args.steps + 1):
        for name in backends:
            tokens, labels = loaders[name].next_batch()
            start = time.perf_counter()
            losses[name].append(trainers[name].train_step(tokens, labels).lm_loss)
            seconds[name] += time.perf_counter() - start
        if step % args.telemetry_interval == 0 or step == args.steps:
            pooled_telemetry(collect_telemetry(trainers["fp8-emulated"].model), telemetry)
        if step % args.log_interval == 0 or step == 1:
            b, f = losses["bf16"][-1], losses["fp8-emulated"][-1]
            print(f"seed {seed} step {step:4d} | bf16 {b:.4f} | fp8 {f:.4f} | rel {100 * (f - b) / b:+.3f}%",
                  flush=True)
    return losses, seconds, telemetry


def mean_and_stderr(xs: list[float]) -> tuple[float, float | None]:
    return statistics.mean(xs), statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None


def plot(path: Path, runs: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_rel) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    for i, losses in enumerate(runs.values()):
        steps = range(1, len(losses["bf16"]) + 1)
        for name, ys in losses.items():
            ax.plot(steps, ys, linewidth=0.8, alpha=0.8, color=COLORS[name], label=name if i == 0 else None)
            if name != "bf16":
                rel = [100 * (x - b) / b for x, b in zip(ys, losses["bf16"])]
                ax_rel.plot(steps, rel, linewidth=0.6, alpha=0.8, color=COLORS[name])
    ax.set_ylabel("LM loss")
    seeds = " ".join(map(str, runs))
    ax.set_title(f"{args.preset}: {args.batch}x{args.seq} tokens/step, lr {args.lr:g}, seeds {seeds}")
    ax.legend()
    ax_rel.axhline(0, color="black", linewidth=0.5)
    ax_rel.set_ylabel("(x - bf16) / bf16, %")
    ax_rel.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit("fp8-vs-bf16: --seeds repeats a seed; each seed is one paired run")
    cfg = ModelConfig.from_preset(args.preset)
    backends = BACKENDS + (() if args.control == "none" else (args.control,))
    others = backends[1:]
    last = min(args.last, args.steps)
    runs, telemetry, seconds = {}, {}, dict.fromkeys(backends, 0.0)
    final, rel = {}, {}  # per seed: final loss per backend, (x - bf16) / bf16 per other backend
    out = result_path(args)
    partial = out.with_suffix(".partial.json")

    def paired_in_seed_order() -> dict[str, list[float]]:
        return {n: [rel[s][n] for s in args.seeds if s in rel] for n in others}

    calls = [(cfg, args, seed, backends) for seed in args.seeds]
    for i, (losses, secs, tele) in map_jobs(train_pair, calls, args.jobs):
        seed = args.seeds[i]
        runs[seed] = losses
        pooled_telemetry({"run": tele}, telemetry)
        for n in backends:
            seconds[n] += secs[n]
        final[seed] = {n: sum(losses[n][-last:]) / last for n in backends}
        rel[seed] = {n: (final[seed][n] - final[seed]["bf16"]) / final[seed]["bf16"] for n in others}
        print(f"seed {seed} done: final loss " + ", ".join(f"{n} {final[seed][n]:.4f}" for n in backends) + "; " +
              ", ".join(f"({n} - bf16) / bf16 {100 * rel[seed][n]:+.3f}%" for n in others), flush=True)
        # A multi-seed run takes hours on CPU: keep what is done if it is stopped before the end.
        write_partial(partial, {"args": vars(args), "final_loss": final, "paired_rel_diff": paired_in_seed_order()})
    runs = {seed: runs[seed] for seed in args.seeds}
    final = {seed: final[seed] for seed in args.seeds}
    paired = paired_in_seed_order()

    summary = {n: dict(zip(("mean", "stderr"), mean_and_stderr(paired[n]))) for n in others}
    rel_final = summary["fp8-emulated"]["mean"]
    ratio = seconds["fp8-emulated"] / seconds["bf16"]
    partial.unlink(missing_ok=True)
    png = out.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(png, runs, args)

    print(f"\n{args.preset}, {args.steps} steps of {args.batch}x{args.seq} tokens, lr {args.lr:g}; "
          f"final loss = mean LM loss of the last {last} steps")
    print(f"{'seed':>6} " + " ".join(f"{n:>13}" for n in backends) + " " +
          " ".join(f"{'(' + n.split('-')[0] + ' - bf16)/bf16':>17}" for n in others))
    for i, seed in enumerate(args.seeds):
        print(f"{seed:>6} " + " ".join(f"{final[seed][n]:13.4f}" for n in backends) + " " +
              " ".join(f"{100 * paired[n][i]:+16.3f}%" for n in others))
    for n in others:
        s = summary[n]
        err = "" if s["stderr"] is None else f" ± {100 * s['stderr']:.3f}% (standard error, {len(args.seeds)} seeds)"
        print(f"({n} - bf16) / bf16: {100 * s['mean']:+.3f}%{err}")
    print(f"V3: < 0.25%.  fp8/bf16 step time {ratio:.2f}x")
    for kind, t in telemetry.items():
        print(f"fp8 {kind:<6}: underflow {t['underflow'] / t['numel']:.2e}, "
              f"subnormal {t['subnormal'] / t['numel']:.2e} of {t['numel']:,} sampled elements")
    print(f"plot: {png}")
    return {"preset": args.preset, "steps": args.steps, "batch": args.batch, "seq": args.seq, "seeds": args.seeds,
            "lr": args.lr, "last": last, "final_loss": {str(s): f for s, f in final.items()},
            "paired_rel_diff": paired, "summary": summary, "rel_diff_final": rel_final,
            "rel_diff_stderr": summary["fp8-emulated"]["stderr"], "step_time_ratio_fp8_over_bf16": ratio,
            "seconds_per_step": {n: seconds[n] / (args.steps * len(args.seeds)) for n in backends},
            "fp8_telemetry": telemetry, "losses": {str(s): v for s, v in runs.items()}, "plot": str(png)}
