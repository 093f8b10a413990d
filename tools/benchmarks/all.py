"""Run every CPU benchmark with settings that fit about 15 minutes on 2 cores, and tabulate headlines vs targets.

Each benchmark runs as its own ``python tools/bench.py <cmd>`` subprocess (pipeline starts mpirun itself, and
a crash or a leaked thread setting in one cannot spoil the next) and writes its JSON as usual, named
``<cmd>-<label>-all-<date>.json`` so the shortened runs never overwrite the full-length ones that
BENCHMARKS.md cites. ``kernels`` times GPU kernels: with a GPU it runs in full, without one only its
``--smoke`` path runs (correctness in Triton's interpreter; its times mean nothing). ``convert`` runs
when tools/benchmarks/convert.py exists. The summary (this command's own JSON) lists each headline
number next to its target, the wall time of each subcommand and the total.
"""

from __future__ import annotations

import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import RESULTS

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _train_step(r) -> list[tuple]:
    ratio = r.get("ratio_moelib_over_transformers")
    return [(f"moelib / transformers tokens/s ({r['dtype']})", ratio, ">= 2x", ratio is not None and ratio >= 2)]


def _quant(r) -> list[tuple]:
    rows = []
    for kind in ("dense", "moe"):
        v = _get(r, "saved_bytes", kind, "ratio_gemm_inputs")
        rows.append((f"FP8 / bf16 saved GEMM inputs ({kind})", v, "<= 0.55", v is not None and v <= 0.55))
    worst = _get(r, "error_real", "gradients", "1x128", "token_rel_max")
    rows.append(("worst token rel. error, gradients 1x128", worst, "< 1 (none flushed)",
                 worst is not None and worst < 1))
    return rows


def _fp8_vs_bf16(r) -> list[tuple]:
    v = r.get("rel_diff_final")
    return [("(fp8 - bf16) / bf16 final loss", v, "|x| < 0.25 %", v is not None and abs(v) < 2.5e-3)]


def _pipeline(r) -> list[tuple]:
    exact = all(s["exact"] for s in r.get("simulated", []))
    dp, ob = _get(r, "measured", "dualpipe", "idle_fraction"), _get(r, "measured", "1f1b", "idle_fraction")
    return [("simulated bubbles equal the formulas", exact, "all", exact),
            ("DualPipe idle fraction (1F1B: " + (f"{ob:.3f})" if ob is not None else "n/a)"), dp, "< 1F1B's",
             dp is not None and ob is not None and dp < ob)]


def _memory(r) -> list[tuple]:
    rows = []
    for preset, p in r.get("presets", {}).items():
        for kind, t in p.get("target", {}).items():
            rows.append((f"{preset} {kind} layer held, fp8+selective / bf16", t["ratio"], f"<= {t['target']}",
                         t["met"]))
    return rows


def _balance(r) -> list[tuple]:
    free, base = _get(r, "runs", "loss-free"), _get(r, "runs", r.get("baseline"))
    if not free or not base:
        return []
    glob, pooled, batch = (r["max_vio_global_ratio_aux_over_free"], r["max_vio_pooled_ratio_aux_over_free"],
                           r["max_vio_ratio_aux_over_free"])
    return [(f"MaxVio_global held out, {r['baseline']} / loss-free ({base['max_vio_global_val']:.3f} / "
             f"{free['max_vio_global_val']:.3f})", glob, ">= 5x", glob >= 5),
            (f"MaxVio pooled over training, same ({base['max_vio_pooled_last']:.3f} / "
             f"{free['max_vio_pooled_last']:.3f})", pooled, "(>= 5x)", pooled >= 5),
            (f"MaxVio per batch, same ({base['max_vio_last']:.3f} / {free['max_vio_last']:.3f})", batch, "(>= 5x)",
             batch >= 5),
            ("held-out LM loss loss-free - aux-loss", free["lm_loss_val"] - base["lm_loss_val"], "<= 0",
             free["lm_loss_val"] <= base["lm_loss_val"])]


def _kernels(r) -> list[tuple]:
    t = r.get("targets", {})
    rows = [("kernels match the emulated reference" + (" (smoke, CPU)" if r.get("smoke") else ""),
             t.get("all_correct"), "all", t.get("all_correct"))]
    if not r.get("smoke"):
        best = min((g["speedup_vs_bf16"] or 0) for g in r["gemm"])
        frac = min(q["fraction_of_copy"] for q in r["quant"])
        rows += [("FP8 block GEMM / torch bf16 (worst shape)", best, ">= 1.5x", t.get("gemm_met")),
                 ("quantisation / copy bandwidth (worst)", frac, ">= 70 %", t.get("quant_met"))]
    return rows


def _convert(r) -> list[tuple]:
    rows = []
    for run in r.get("runs", []):
        if run.get("what") == "export bf16":
            rows += [("convert export bf16 GB/s / copy", run.get("vs_copy"), "", None),
                     ("convert export bf16 peak RSS / largest shard", run.get("rss_over_largest_shard"), "", None)]
    return rows


def plan() -> list[tuple[str, str, list[str], object]]:
    """(command, label, argv, headline extractor): argv chosen for ~15 minutes in total on 2 idle cores."""
    steps = [
        ("balance", "tiny", ["--jobs", "2"], _balance),  # two variants at a time, one thread each
        ("train-step", "small-fp32", ["--vs-hf", "--preset", "small", "--dtype", "fp32", "--steps", "4",
                                      "--warmup", "1"], _train_step),
        ("train-step", "small-bf16", ["--vs-hf", "--preset", "small", "--dtype", "bf16", "--steps", "4",
                                      "--warmup", "1"], _train_step),
        ("quant", "", ["--train-steps", "30"], _quant),
        ("fp8-vs-bf16", "lr1e-3", ["--lr", "1e-3", "--steps", "100", "--last", "25"], _fp8_vs_bf16),
        ("pipeline", "", [], _pipeline),
        ("memory", "tiny", ["--presets", "tiny", "--time-reps", "1"], _memory),
    ]
    if (HERE / "convert.py").exists():
        steps.append(("convert", "", ["--size-gb", "0.5", "--max-shard-size", "200MB"], _convert))
    steps.append(("kernels", "", [], _kernels) if torch.cuda.is_available()
                 else ("kernels", "smoke", ["--smoke"], _kernels))
    return steps


def add_args(p) -> None:
    p.add_argument("--skip", default="", help="comma-separated subcommands not to run")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")


def run_one(cmd: str, argv: list[str], out: Path) -> tuple[int, float, float]:
    """Exit status, wall seconds and CPU seconds (user + system of the child and its children: on a shared
    machine wall time depends on the neighbours, CPU time much less)."""
    full = [sys.executable, str(ROOT / "tools" / "bench.py"), cmd, "--out", str(out), *argv]
    print(f"\n$ python tools/bench.py {cmd} {' '.join(argv)}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    rc = subprocess.run(full, cwd=ROOT).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return rc, time.perf_counter() - start, cpu


def key_of(cmd: str, label: str) -> str:
    return "-".join(p for p in (cmd, label) if p)


def run(args) -> dict | None:
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    date = datetime.date.today().isoformat()
    todo = [s for s in plan() if s[0] not in skip]
    if args.dry_run:  # nothing ran, so nothing is recorded (no summary overwrites the last real one)
        for cmd, label, argv, _ in todo:
            out = RESULTS / f"{key_of(cmd, label)}-all-{date}.json"
            print(f"python tools/bench.py {cmd} --out {out.relative_to(ROOT)} {' '.join(argv)}")
        return None
    rows, runs, start = [], {}, time.perf_counter()
    for cmd, label, argv, headline in tqdm(todo, desc="bench all", unit="cmd"):
        key = key_of(cmd, label)
        out = RESULTS / f"{key}-all-{date}.json"
        rc, seconds, cpu = run_one(cmd, argv, out)
        runs[key] = {"command": f"python tools/bench.py {cmd} {' '.join(argv)}".strip(), "returncode": rc,
                     "seconds": seconds, "cpu_seconds": cpu, "result": str(out.relative_to(ROOT))}
        if rc != 0 or not out.exists():
            rows.append({"bench": key, "headline": f"FAILED (exit {rc})", "value": None, "target": "", "met": False})
            continue
        for name, value, target, met in headline(json.loads(out.read_text())):
            rows.append({"bench": key, "headline": name, "value": value, "target": target, "met": met})
    total = time.perf_counter() - start
    print_table(rows, runs, total)
    return {"wall_s": total, "cpu_s": sum(r["cpu_seconds"] for r in runs.values()), "runs": runs, "headlines": rows,
            "kernels": "full (GPU)" if torch.cuda.is_available() else "smoke only (no GPU)"}


def print_table(rows: list[dict], runs: dict, total: float) -> None:
    print(f"\n{'bench':<22} {'headline':<58} {'value':>10} {'target':>19} {'met':>5}")
    for r in rows:
        v = r["value"]
        shown = f"{v:10.4g}" if isinstance(v, float) else f"{str(v):>10}"
        print(f"{r['bench']:<22} {r['headline'][:58]:<58} {shown} {r['target']:>19} {str(r['met']):>5}")
    print("\n" + "  ".join(f"{k} {v['seconds']:.0f}s ({v['cpu_seconds']:.0f} CPU-s)" for k, v in runs.items()))
    cpu = sum(v["cpu_seconds"] for v in runs.values())
    print(f"total wall time {total:.0f} s ({total / 60:.1f} min), CPU time {cpu:.0f} s")
