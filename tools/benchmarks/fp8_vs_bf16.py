"""Train the same model on the same data with bf16 and fp8-emulated; report the relative loss difference.

Both runs start from the same weights (same seed) and see the same batches of the default corpus in the
same order; their steps alternate, so the step-time ratio is measured under the same machine load.
Reported: the relative difference of the mean LM loss over the last ``--last`` steps (DeepSeek-V3 reports
< 0.25% over a whole run), the mean per-step relative difference over those steps, the fp8/bf16
step-time ratio, and the FP8 telemetry pooled over the run (sampled every ``--telemetry-interval`` steps).
A PNG of both loss curves is written next to the JSON result.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import torch

from moelib import ModelConfig, TrainConfig
from moelib.precision.telemetry import collect_telemetry
from moelib.train.data import BatchLoader, PackedDataset, default_corpus
from moelib.train.tokenizer import Tokenizer
from moelib.train.trainer import Trainer

BACKENDS = ("bf16", "fp8-emulated")
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def add_args(p) -> None:
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=300, help="~7 min for both runs of tiny on 2 CPU cores")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--control", choices=("none", "fp32"), default="none",
                   help="also train fp32 and report its gap to bf16: the noise floor of this comparison")
    p.add_argument("--last", type=int, default=50, help="steps averaged for the final loss")
    p.add_argument("--telemetry-interval", type=int, default=25)
    p.add_argument("--log-interval", type=int, default=25)


def loader(cfg: ModelConfig, args) -> BatchLoader:
    prefix, tokenizer = default_corpus(cfg.vocab_size)
    dataset = PackedDataset(prefix, args.seq, eod_id=Tokenizer.from_file(tokenizer).eod, vocab_size=cfg.vocab_size)
    return BatchLoader(dataset, args.batch, seed=args.seed)


def pooled_telemetry(stats: dict, totals: dict) -> None:
    for per_weight in stats.values():
        for kind, c in per_weight.items():
            t = totals.setdefault(kind, dict.fromkeys(("numel", "underflow", "subnormal", "saturated", "tiles"), 0))
            for key in t:
                t[key] += c[key]


def plot(path: Path, losses: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_rel) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    steps = range(1, len(losses["bf16"]) + 1)
    colors = {"bf16": "tab:blue", "fp8-emulated": "tab:orange", "fp32": "tab:green"}
    for name in losses:
        ax.plot(steps, losses[name], label=name, linewidth=1, color=colors[name])
    ax.set_ylabel("LM loss")
    ax.set_title(f"{args.preset}: same data and seed, lr {args.lr:g}")
    ax.legend()
    for name in losses:
        if name != "bf16":
            rel = [100 * (f - b) / b for f, b in zip(losses[name], losses["bf16"])]
            ax_rel.plot(steps, rel, linewidth=0.8, color=colors[name])
    ax_rel.axhline(0, color="black", linewidth=0.5)
    ax_rel.set_ylabel("(x - bf16) / bf16, %")
    ax_rel.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    torch.manual_seed(args.seed)
    cfg = ModelConfig.from_preset(args.preset)
    trainers, loaders, losses, seconds = {}, {}, {}, {}
    backends = BACKENDS + (() if args.control == "none" else (args.control,))
    for name in backends:
        precision = {"backend": name, "telemetry_interval": args.telemetry_interval if "fp8" in name else 0}
        tc = TrainConfig(micro_batch_size=args.batch, seq_length=args.seq, train_iters=args.steps, seed=args.seed,
                         lr=args.lr, min_lr=min(args.lr, TrainConfig.min_lr), precision=precision)
        trainers[name], loaders[name] = Trainer(cfg, tc), loader(cfg, args)
        losses[name], seconds[name] = [], 0.0
    telemetry: dict = {}
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
            print(f"step {step:4d} | bf16 {b:.4f} | fp8 {f:.4f} | rel {100 * (f - b) / b:+.3f}%", flush=True)

    last = min(args.last, args.steps)
    mean = {n: sum(losses[n][-last:]) / last for n in backends}
    rel = {n: (mean[n] - mean["bf16"]) / mean["bf16"] for n in backends if n != "bf16"}
    rel_final = rel["fp8-emulated"]
    per_step = [abs(f - b) / b for f, b in zip(losses["fp8-emulated"][-last:], losses["bf16"][-last:])]
    ratio = seconds["fp8-emulated"] / seconds["bf16"]
    out = args.out or RESULTS / f"{args.command}-{datetime.date.today().isoformat()}.json"
    png = Path(out).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(png, losses, args)

    print(f"\n{args.preset}, {args.steps} steps of {args.batch}x{args.seq} tokens, mean LM loss of the last {last}:")
    print(f"{'backend':<14} {'loss':>8} {'s/step':>8}")
    for n in backends:
        print(f"{n:<14} {mean[n]:8.4f} {seconds[n] / args.steps:8.3f}")
    print(f"relative difference (fp8 - bf16) / bf16: {100 * rel_final:+.3f}%  (V3: < 0.25%); "
          f"mean per-step |rel diff| {100 * sum(per_step) / last:.3f}%; fp8/bf16 step time {ratio:.2f}x")
    if args.control != "none":
        print(f"control: ({args.control} - bf16) / bf16 = {100 * rel[args.control]:+.3f}% (two high-precision runs)")
    for kind, t in telemetry.items():
        print(f"fp8 {kind:<6}: underflow {t['underflow'] / t['numel']:.2e}, "
              f"subnormal {t['subnormal'] / t['numel']:.2e} of {t['numel']:,} sampled elements")
    print(f"plot: {png}")
    return {"preset": args.preset, "steps": args.steps, "batch": args.batch, "seq": args.seq, "seed": args.seed,
            "last": last, "mean_loss_last": mean, "rel_diff_final": rel_final,
            "mean_abs_rel_diff_per_step": sum(per_step) / last, "step_time_ratio_fp8_over_bf16": ratio,
            "lr": args.lr, "rel_diff_vs_bf16": rel,
            "seconds_per_step": {n: seconds[n] / args.steps for n in backends}, "fp8_telemetry": telemetry,
            "losses": losses, "plot": str(png)}
