"""Pipeline bubbles: simulated against REFERENCE §5's formulas, and measured in a real mpirun run.

Simulated: each schedule's programs run in the event simulator with F=1, B=2 (I=W=1) and F&B=2.5, and
the bubble is compared with the published formula. Measured: the tiny model trains a few steps under
mpirun with 1F1B and with DualPipe at the same PP, EP and micro-batch count; the last step's per-rank
timeline gives the idle fraction (time outside ops plus time an op waits for a message, over ranks x
step time), a Chrome trace and a PNG timeline in which the all-to-alls in flight are a band under each
rank, so their overlap with the other micro-batch's compute inside F&B ops is visible.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

from moelib.parallel.pipeline.schedule import build_schedule
from moelib.parallel.pipeline.simulate import Costs, plot_timeline, published_bubble, simulate, to_chrome_trace

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "_pipeline_worker.py"


def add_args(p) -> None:
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-run", action="store_true", help="simulate only, start no mpirun job")


def simulated() -> list[dict]:
    costs = Costs(F=Fraction(1), B=Fraction(2), W=Fraction(1), FB=Fraction(5, 2))
    rows = []
    for name, pps in (("1f1b", (2, 4, 8)), ("zb1p", (2, 4, 8)), ("dualpipe", (2, 4, 8)), ("dualpipev", (2, 4))):
        for pp in pps:
            s = build_schedule(name, pp, 4 * pp)
            r = simulate(s, costs)
            rows.append({"schedule": s.name, "pp": pp, "microbatches": 4 * pp, "bubble": float(r.bubble),
                         "formula": float(published_bubble(s, costs)), "exact": r.bubble == published_bubble(s, costs),
                         "peak_activations": max(r.peak_activations)})
    return rows


def measure(schedule: str, args, out_dir: Path) -> dict:
    out = out_dir / f"{schedule}.json"
    ranks = args.pp * args.ep
    cmd = [str(Path(sys.executable).parent / "mpirun"), "--allow-run-as-root", "--oversubscribe", "-n", str(ranks),
           sys.executable, str(WORKER), "--schedule", schedule, "--pp", str(args.pp), "--ep", str(args.ep),
           "--microbatches", str(args.microbatches), "--steps", str(args.steps), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    data = json.loads(out.read_text())
    events = data["events"]
    ops = [e for e in events if e["stream"] == "compute"]
    waits = [e for e in events if e["stream"] == "wait"]
    a2a = [e for e in events if e["stream"] == "all-to-all"]
    t0, t1 = min(e["start"] for e in ops), max(e["end"] for e in ops)
    ranks_seen = sorted({e["rank"] for e in ops})
    busy = sum(e["end"] - e["start"] for e in ops) - sum(e["end"] - e["start"] for e in waits)
    idle = 1 - busy / ((t1 - t0) * len(ranks_seen))
    fb_ops = [e for e in ops if e["kind"] == "FB"]

    def inside_fb(e):
        return any(f["rank"] == e["rank"] and f["start"] <= e["start"] and e["end"] <= f["end"] for f in fb_ops)

    overlapped = sum(e["end"] - e["start"] for e in a2a if inside_fb(e))
    total_a2a = sum(e["end"] - e["start"] for e in a2a)
    for e in events:  # timestamps relative to the step's start, for the trace and the plot
        e["start"], e["end"] = e["start"] - t0, e["end"] - t0
    trace = out_dir / f"pipeline-{schedule}-trace.json"
    trace.write_text(json.dumps(to_chrome_trace(events)))
    png = out_dir / f"pipeline-{schedule}-timeline.png"
    plot_timeline(events, str(png), f"{schedule}: {data['layout']} (measured, idle {idle:.1%})")
    return {"layout": data["layout"], "step_s": t1 - t0, "idle_fraction": idle, "tokens_per_s": data["tokens_per_s"],
            "all_to_all_s": total_a2a, "all_to_all_inside_fb_s": overlapped, "trace": str(trace), "timeline": str(png)}


def run(args) -> dict:
    sim = simulated()
    print("simulated bubbles (F=1, B=2, W=1, F&B=2.5, micro-batches = 4 x PP)")
    print(f"{'schedule':<11}{'PP':>4}{'bubble':>9}{'formula':>9}{'exact':>7}{'peak act':>10}")
    for r in sim:
        print(f"{r['schedule']:<11}{r['pp']:>4}{r['bubble']:>9.2f}{r['formula']:>9.2f}{str(r['exact']):>7}"
              f"{r['peak_activations']:>10}")
    result = {"simulated": sim, "measured": {}}
    if args.no_run:
        return result
    # The trace and timeline go next to the JSON result (--out moves both).
    out_dir = Path(args.out).parent if args.out else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in ("1f1b", "dualpipe"):
            m = measure(schedule, args, Path(tmp))
            for key in ("trace", "timeline"):  # keep the artefacts next to the results
                name = Path(m[key]).name
                target = out_dir / (name.replace("pipeline", Path(args.out).stem, 1) if args.out else name)
                target.write_bytes(Path(m[key]).read_bytes())
                m[key] = str(target.relative_to(ROOT)) if target.is_relative_to(ROOT) else str(target)
            result["measured"][schedule] = m
    print(f"\nmeasured, {args.steps}th step of the tiny model, PP {args.pp} x EP {args.ep}, "
          f"{args.microbatches} micro-batches")
    print(f"{'schedule':<10}{'step s':>8}{'idle':>8}{'a2a s':>8}{'a2a in F&B':>12}")
    for name, m in result["measured"].items():
        print(f"{name:<10}{m['step_s']:>8.2f}{m['idle_fraction']:>8.1%}{m['all_to_all_s']:>8.2f}"
              f"{m['all_to_all_inside_fb_s']:>12.2f}")
    dp, base = result["measured"]["dualpipe"], result["measured"]["1f1b"]
    result["dualpipe_idle_below_1f1b"] = dp["idle_fraction"] < base["idle_fraction"]
    return result
