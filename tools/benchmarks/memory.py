"""Activation memory per micro-batch under {bf16, fp8-emulated} x {none, selective, full} recomputation.

Two measurements, both counting tensor storages (each distinct storage once, parameters never):

* held: what autograd keeps between forward and backward. Every storage an op creates during the forward
  is tracked through a weak reference (a TorchDispatchMode sees every op, inside custom autograd functions
  and checkpoint regions too); the ones still alive when the forward returns, minus its output, are what
  backward holds: saved tensors, checkpoint inputs, selective-checkpoint caches, FP8 caches.
  ``saved`` is the older measure of tools/benchmarks/quant.py (torch.autograd.graph.saved_tensors_hooks),
  shown beside it: the two agree except where a selective checkpoint caches an op's output outside
  autograd's saved tensors (the attention core's results under "selective"), which only ``held`` sees.
* peak: the most bytes alive at once (checked after every op) through forward and backward of one
  micro-batch of the whole model (loss with MTP), above what was alive before it; parameters' .grad
  exist beforehand, so this is activations plus backward's transients.

Per layer (one dense and one MoE decoder layer) the numbers are per token per layer, the slope between
batch 2 and 4 so per-step constants (weight casts, RoPE tables) cancel. The whole model is measured per
micro-batch, which includes such constants (the bf16 backend keeps a bf16 copy of every weight for
backward, the FP8 one re-quantises the master weight instead), and per token as the slope from half the
micro-batch. Ratios are against bf16 with no recomputation. "selective" under fp8-emulated keeps SwiGLU
inputs in FP8 (V3); "selective-exact" keeps them in bf16 and leaves every gradient unchanged.

Expert rows are padded per expert (bf16 on CPU: to a multiple of 32) as always, but never to one common
size (``configure`` sets GroupedExperts.equal_groups_up_to to 1): that CPU speed layout is taken only when a
batch routes evenly enough, so the bf16 baseline would jump with the batch (it did between batch 2 and 4
here: +14 % for the MoE layer).
"""

from __future__ import annotations

import statistics
import time

import torch

from moelib import ModelConfig
from moelib.model import build_model
from moelib.plan.activations import LiveStorages, configure, held_breakdown, layer_breakdown_per_token
from moelib.precision.backends import name_linears

CONFIGS = (("bf16", "none"), ("bf16", "selective"), ("bf16", "full"),
           ("fp8-emulated", "none"), ("fp8-emulated", "selective"), ("fp8-emulated", "selective-exact"),
           ("fp8-emulated", "full"))
BASELINE = "bf16/none"
TARGET = 0.55


def add_args(p) -> None:
    p.add_argument("--presets", default="tiny,small", help="comma-separated ModelConfig presets")
    p.add_argument("--batch", type=int, default=4, help="micro-batch size (sequences) of the whole-model peak")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--time-reps", type=int, default=2, help="timed forward+backward steps per configuration")
    p.add_argument("--scale-to", default="v3-671b",
                   help="also break the MoE layer down at this preset's shapes (extrapolated as the planner does; "
                        "'' for none)")


def variant(args) -> str:
    return args.presets.replace(",", "-")


def layer_bytes(cfg: ModelConfig, backend: str, mode: str, index: int, seq: int, seed: int) -> dict[str, float]:
    """Per-token held and saved bytes of layer ``index`` (slope between batch 2 and 4)."""
    model = configure(build_model(cfg, backend, seed=seed), mode)
    name_linears(model)
    model.train()
    layer = model.layers[str(index)]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    cos, sin = model.rope(seq, torch.device("cpu"))
    counts = []
    for batch in (2, 4):
        base = torch.randn(batch, seq, cfg.hidden_size, generator=torch.Generator().manual_seed(seed),
                           requires_grad=True)
        saved: dict[int, int] = {}

        def pack(t, saved=saved):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        tracker = LiveStorages(model)
        with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), model.backend.autocast("cpu"):
            hidden = base.clone()  # made here so that it is counted if (and only if) the layer keeps it
            out = layer(hidden, cos, sin)
            del hidden
        counts.append({"held": tracker.live(exclude=(out,)), "saved": sum(saved.values())})
        out.float().sum().backward()  # check that backward runs, and free the graph
    tokens = 2 * seq
    return {k: (counts[1][k] - counts[0][k]) / tokens for k in counts[0]}


def model_peak(cfg: ModelConfig, backend: str, mode: str, batch: int, seq: int, seed: int, reps: int) -> dict:
    """Whole model: held after forward and peak through forward+backward of a micro-batch of ``batch``
    sequences (bytes), the same per token (slope from batch/2 to batch: without per-step constants such
    as the bf16 backend's weight copies), and the step time."""
    model = configure(build_model(cfg, backend, seed=seed), mode)
    model.train()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)

    def step(rows: int, tracker: LiveStorages | None = None) -> int:
        with model.backend.autocast("cpu"):
            loss = model.compute_loss(tokens[:rows, :-1], tokens[:rows, 1:]).loss
        held = tracker.live(exclude=(loss,)) if tracker is not None else 0
        loss.backward()
        return held

    step(batch)  # warm-up; leaves every .grad allocated, as in training after the first step
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    out = {}
    for rows in (batch // 2, batch):
        tracker = LiveStorages(model, track_peak=True)
        with tracker:
            out[rows] = step(rows, tracker), tracker.peak
    tokens_diff = (batch - batch // 2) * seq
    return {"held": out[batch][0], "peak": out[batch][1],
            "held_per_token": (out[batch][0] - out[batch // 2][0]) / tokens_diff,
            "peak_per_token": (out[batch][1] - out[batch // 2][1]) / tokens_diff,
            "step_s": statistics.median(times) if times else None}


def run_preset(preset: str, args) -> dict:
    cfg = ModelConfig.from_preset(preset)
    layers = {"dense": 0, "moe": cfg.first_k_dense_replace}
    out = {"layers": {}, "model": {}}
    for backend, mode in CONFIGS:
        key = f"{backend}/{mode}"
        out["layers"][key] = {kind: layer_bytes(cfg, backend, mode, index, args.seq, args.seed)
                              for kind, index in layers.items()}
        out["model"][key] = model_peak(cfg, backend, mode, args.batch, args.seq, args.seed, args.time_reps)
    base_layers, base_model = out["layers"][BASELINE], out["model"][BASELINE]
    for key in out["layers"]:
        for kind, v in out["layers"][key].items():
            v["ratio_held"] = v["held"] / base_layers[kind]["held"]
            v["ratio_saved"] = v["saved"] / base_layers[kind]["saved"]
        m, base = out["model"][key], out["model"][f"{key.split('/')[0]}/none"]
        for what in ("held", "peak", "held_per_token", "peak_per_token"):
            m[f"ratio_{what}"] = m[what] / base_model[what]
        if m["step_s"] and base["step_s"]:
            m["time_vs_no_recompute"] = m["step_s"] / base["step_s"]
    out["breakdown"] = breakdown(held_breakdown(cfg, *BREAKDOWN, "moe", args.seq))
    fp8_sel = out["layers"]["fp8-emulated/selective"]
    out["target"] = {kind: {"ratio": fp8_sel[kind]["ratio_held"], "target": TARGET,
                            "met": fp8_sel[kind]["ratio_held"] <= TARGET} for kind in layers}
    return out


BREAKDOWN = ("fp8-emulated", "selective")


def breakdown(parts: dict) -> list[dict]:
    """held_breakdown's labels as rows, largest first."""
    rows = [{"module": m, "made_by": site, "dtype": dtype, "bytes_per_token": b}
            for (m, site, dtype), b in parts.items()]
    return sorted(rows, key=lambda r: -r["bytes_per_token"])


def print_breakdown(title: str, rows: list[dict]) -> None:
    print(f"\n{title}: what backward holds per token, {'/'.join(BREAKDOWN)}, by the module and function that made it")
    print(f"{'bytes':>9} {'elements':>9} {'dtype':<14} {'module':<34} made by")
    for r in rows:
        size = torch.empty((), dtype=getattr(torch, r["dtype"])).element_size() if r["dtype"] != "?" else 1
        print(f"{r['bytes_per_token']:9.0f} {r['bytes_per_token'] / size:9.0f} {r['dtype']:<14} {r['module']:<34} "
              f"{r['made_by']}")
    print(f"{sum(r['bytes_per_token'] for r in rows):9.0f} total")


def print_preset(preset: str, r: dict, args) -> None:
    print(f"\n{preset}: bytes per token per layer, held for backward (saved-tensor hooks alone), seq {args.seq}")
    print(f"{'config':<32} {'dense held':>10} {'saved':>8} {'ratio':>6}  {'moe held':>10} {'saved':>8} {'ratio':>6}")
    for key, v in r["layers"].items():
        d, m = v["dense"], v["moe"]
        print(f"{key:<32} {d['held']:10.0f} {d['saved']:8.0f} {d['ratio_held']:6.3f}  "
              f"{m['held']:10.0f} {m['saved']:8.0f} {m['ratio_held']:6.3f}")
    print(f"\n{preset}: whole model (loss with MTP), one micro-batch of {args.batch}x{args.seq} tokens: MiB, and "
          f"bytes per token (slope from batch {args.batch // 2}); step time vs the same backend without recompute")
    print(f"{'config':<32} {'held':>7} {'ratio':>6} {'peak':>7} {'ratio':>6} {'held/tok':>9} {'ratio':>6} "
          f"{'peak/tok':>9} {'ratio':>6} {'step s':>7} {'time x':>6}")
    for key, m in r["model"].items():
        step = f"{m['step_s']:7.3f} {m.get('time_vs_no_recompute', float('nan')):6.2f}" if m["step_s"] else ""
        print(f"{key:<32} {m['held'] / 2**20:7.1f} {m['ratio_held']:6.3f} {m['peak'] / 2**20:7.1f} "
              f"{m['ratio_peak']:6.3f} {m['held_per_token']:9.0f} {m['ratio_held_per_token']:6.3f} "
              f"{m['peak_per_token']:9.0f} {m['ratio_peak_per_token']:6.3f} {step}")
    print_breakdown(f"{preset} MoE layer", r["breakdown"])
    for kind, t in r["target"].items():
        print(f"{preset} {kind} layer: fp8-emulated/selective held / bf16/none = {t['ratio']:.3f} "
              f"(target <= {TARGET}: {'met' if t['met'] else 'NOT met'})")


def run(args) -> dict:
    torch.manual_seed(args.seed)
    results = {}
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        start = time.perf_counter()
        results[preset] = run_preset(preset, args)
        results[preset]["seconds"] = time.perf_counter() - start
        print_preset(preset, results[preset], args)
    scaled = None
    if args.scale_to:
        cfg = ModelConfig.from_preset(args.scale_to)
        scaled = breakdown(layer_breakdown_per_token(cfg, *BREAKDOWN, "moe", args.seq))
        print_breakdown(f"{args.scale_to} MoE layer (extrapolated from two shrunken proxies)", scaled)
    return {"breakdown_scaled": {"preset": args.scale_to, "rows": scaled},
            "batch": args.batch, "seq": args.seq, "baseline": BASELINE, "target": TARGET, "presets": results}
