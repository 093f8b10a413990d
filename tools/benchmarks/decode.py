"""Decoding: moelib.generate vs transformers' generate (tokens/s), KV cache bytes, MTP speculative decoding, FP8.

One model, exported once as an HF directory, is loaded by both: moelib (absorbed MLA over the latent cache)
and transformers' DeepseekV3ForCausalLM (eager attention, its DynamicCache of full per-head K and V), both
in --dtype, greedy, --prompt-len prompt tokens and --new new tokens at each --batches size; each figure is
the best of --repeats runs. Also: cache bytes per token per sequence (moelib's stats, transformers' from
its returned cache) with the analytic v3-671b figures; speculative (MTP) vs plain tokens/s at batch 1 and
the acceptance rate on the prompts; FP8-resident bytes vs bf16 (and v3-671b's from its shapes) and what
FP8 costs in logits and greedy tokens on the last batch's prompts (benchmarks/_fp8_resident.py). Prompts
come from the held-out tail of the default corpus when its vocabulary matches the model's, else random ids
(say which in the result). Without --load the model has random weights: acceptance is then meaningless,
and the table says so.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks import result_path
from benchmarks._fp8_resident import quality, resident
from moelib import ModelConfig
from moelib.convert import load_model
from moelib.inference.generate import generate
from moelib.inference.load import cast_weights
from moelib.model import build_model
from moelib.train.hf_format import to_hf_config, to_hf_state_dict


def add_args(p) -> None:
    p.add_argument("--load", default=None, help="a trained checkpoint or HF dir (default: random --preset weights)")
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    p.add_argument("--compile", action="store_true",
                   help="also time generate(compile=True) (plain, and speculative at batch 1), compiled before timing")


def variant(args) -> str:
    return args.dtype


def analytic_v3() -> dict:
    """Per-token bf16 cache of the v3-671b preset: MLA's latent vs multi-head K and V."""
    cfg = ModelConfig.from_preset("v3-671b")
    mla = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    mha = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 2
    return {"mla_bytes": mla, "mha_bytes": mha, "ratio": mha / mla}


def prompts(cfg: ModelConfig, batch: int, length: int) -> tuple[torch.Tensor, str]:
    """[batch, length] prompt ids from the held-out end of the default corpus, else random."""
    try:
        from moelib.train.data import default_dataset

        data = default_dataset(cfg.vocab_size, length)
        n = len(data)
        rows = [torch.as_tensor(data[n - 1 - i][:length], dtype=torch.long) for i in range(batch)]
        return torch.stack(rows), "default corpus (last sequences)"
    except Exception as e:  # no corpus for this vocabulary: the timing does not depend on the text
        return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)), \
            f"random ids ({type(e).__name__})"


def interleaved_best(repeats: int, runs: dict) -> dict[str, tuple[float, object, float]]:
    """{name: (best seconds, last output, best CPU seconds)} of each zero-argument callable, the contenders
    taking turns each repeat, so load from other jobs on shared cores falls on all of them alike. CPU seconds
    (this process's, all threads) leave out the time other jobs held the cores."""
    best = {name: (float("inf"), None, float("inf")) for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t, cpu = time.perf_counter(), time.process_time()
            out = fn()
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), out, min(best[name][2], cpu))
    return best


def hf_cache_bytes_per_token(out, batch: int) -> float:
    """Bytes per token of one sequence in transformers' returned cache, all layers."""
    tensors = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
    return sum(t.numel() * t.element_size() for t in tensors) / (batch * tensors[0].shape[-2])


def plot(path: Path, rows: list[dict], title: str) -> None:
    """Tokens/s per batch: moelib, transformers, and MTP speculative where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    series = [("moelib", "moelib_tokens_per_s"), ("transformers", "hf_tokens_per_s"),
              ("moelib + MTP speculative", "speculative_tokens_per_s"), ("moelib compiled", "compiled_tokens_per_s"),
              ("moelib compiled + MTP", "speculative_compiled_tokens_per_s")]
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        xs = [j + i * width for j, r in enumerate(rows) if key in r]
        ax.bar(xs, [r[key] for r in rows if key in r], width, label=label)
    ax.set_xticks([j + width for j in range(len(rows))], [f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("new tokens / s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.load:
            model = load_model(args.load)
        else:
            model = build_model(ModelConfig.from_preset(args.preset), "fp32", seed=0).eval()
        cfg = model.cfg
        hf_dir = Path(tmp)
        if not args.no_hf:  # the same weights for transformers
            save_file({k: v.contiguous().clone() for k, v in to_hf_state_dict(model.state_dict(), cfg)},
                      str(hf_dir / "model.safetensors"))
            (hf_dir / "config.json").write_text(json.dumps(to_hf_config(cfg, "float32")))
        fp32_copy = copy.deepcopy(model)
        model = cast_weights(model, args.dtype)
        torch_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        hf = None
        if not args.no_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype, attn_implementation="eager").eval()
        rows, source = [], ""
        for batch in [int(b) for b in args.batches.split(",")]:
            ids, source = prompts(cfg, batch, args.prompt_len)
            runs = {"moelib": partial(generate, model, ids, args.new)}
            if hf is not None:
                runs["hf"] = partial(torch.no_grad()(hf.generate), ids, max_new_tokens=args.new,
                                     min_new_tokens=args.new, do_sample=False, pad_token_id=0,
                                     return_dict_in_generate=True)
            if batch == 1 and len(model.mtp):
                runs["mtp"] = partial(generate, model, ids, args.new, speculative="mtp")
            compile_s = {}
            if args.compile:  # compiled once here, so the timed runs reuse the compiled steps
                runs["compiled"] = partial(generate, model, ids, args.new, compile=True)
                if "mtp" in runs:
                    runs["mtp_compiled"] = partial(generate, model, ids, args.new, speculative="mtp", compile=True)
                for name in ("compiled", "mtp_compiled"):
                    if name in runs:
                        t = time.perf_counter()
                        runs[name]()
                        compile_s[name] = time.perf_counter() - t
            best = interleaved_best(args.repeats, runs)
            seconds, ours, cpu = best["moelib"]
            row = {"batch": batch, "moelib_tokens_per_s": batch * args.new / seconds,
                   "moelib_cache_bytes_per_token": ours.stats["kv_bytes_per_token"]}
            if "hf" in best:
                hf_seconds, theirs, hf_cpu = best["hf"]
                row.update(hf_tokens_per_s=batch * args.new / hf_seconds, speedup=hf_seconds / seconds,
                           cpu_speedup=hf_cpu / cpu,
                           hf_cache_bytes_per_token=hf_cache_bytes_per_token(theirs, batch),
                           same_tokens=float((theirs.sequences[:, -args.new:] == ours.tokens[:, -args.new:])
                                             .float().mean()))
            if "mtp" in best:
                s_seconds, spec, _ = best["mtp"]
                row.update(speculative_tokens_per_s=args.new / s_seconds, acceptance_rate=spec.stats["acceptance_rate"],
                           speculative_speedup=seconds / s_seconds,
                           speculative_same_tokens=bool(torch.equal(spec.tokens, ours.tokens)))
            if "compiled" in best:
                c_seconds, comp, c_cpu = best["compiled"]
                same = (comp.tokens[:, -args.new:] == ours.tokens[:, -args.new:]).float().mean()
                row.update(compiled_tokens_per_s=batch * args.new / c_seconds, compiled_vs_eager=seconds / c_seconds,
                           compiled_same_tokens=float(same),
                           compile_s=compile_s["compiled"])
                if "hf" in best:
                    row.update(compiled_speedup=best["hf"][0] / c_seconds, compiled_cpu_speedup=best["hf"][2] / c_cpu)
            if "mtp_compiled" in best:
                s_seconds, spec, _ = best["mtp_compiled"]
                row.update(speculative_compiled_tokens_per_s=args.new / s_seconds,
                           speculative_compiled_speedup=best["compiled"][0] / s_seconds,
                           speculative_compiled_same_tokens=bool(torch.equal(spec.tokens, best["compiled"][1].tokens)))
            rows.append(row)
        memory = resident(fp32_copy)
        fp8_cost = quality(fp32_copy, ids, args.new)
    v3 = analytic_v3()
    png = result_path(args, variant(args)).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(png, rows, f"decode, {args.load or args.preset}, {args.dtype}, prompt {args.prompt_len}, {args.new} new")
    print(f"decode: {args.load or args.preset + ' (random weights)'}, {args.dtype}, prompt {args.prompt_len}, "
          f"{args.new} new, prompts: {source}")
    print("| batch | moelib tok/s | transformers tok/s | speed-up | CPU-time speed-up | cache B/token: moelib "
          "| transformers | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['moelib_tokens_per_s']:.1f} | {r.get('hf_tokens_per_s', float('nan')):.1f} | "
              f"{r.get('speedup', float('nan')):.2f}x | {r.get('cpu_speedup', float('nan')):.2f}x | "
              f"{r['moelib_cache_bytes_per_token']} | "
              f"{r.get('hf_cache_bytes_per_token', float('nan')):.0f} | {r.get('same_tokens', float('nan')):.3f} |")
    for r in rows:
        if "compiled_tokens_per_s" in r:
            print(f"compiled (generate(compile=True)), batch {r['batch']}: {r['compiled_tokens_per_s']:.1f} tok/s, "
                  f"{r['compiled_vs_eager']:.2f}x eager moelib, {r.get('compiled_speedup', float('nan')):.2f}x "
                  f"transformers (CPU time {r.get('compiled_cpu_speedup', float('nan')):.2f}x), same tokens as eager "
                  f"{r['compiled_same_tokens']:.3f}, first call (compiling) {r['compile_s']:.0f} s")
        if "speculative_compiled_tokens_per_s" in r:
            print(f"compiled MTP speculative, batch 1: {r['speculative_compiled_tokens_per_s']:.1f} tok/s vs compiled "
                  f"plain ({r['speculative_compiled_speedup']:.2f}x), same tokens as compiled plain greedy: "
                  f"{r['speculative_compiled_same_tokens']}")
    for r in rows:
        if "speculative_tokens_per_s" in r:
            print(f"MTP speculative, batch 1: {r['speculative_tokens_per_s']:.1f} tok/s vs plain "
                  f"{r['moelib_tokens_per_s']:.1f} ({r['speculative_speedup']:.2f}x), acceptance "
                  f"{r['acceptance_rate']:.2f}{'' if args.load else ' (random weights: not meaningful)'}, "
                  f"same tokens as plain greedy: {r['speculative_same_tokens']}")
    print(f"resident weights: fp8 {memory['fp8_bytes'] / 1e6:.1f} MB vs bf16 {memory['bf16_bytes'] / 1e6:.1f} MB "
          f"({memory['ratio']:.3f}x; the quantised weights alone {memory['quantised_weights_ratio']:.3f}x); "
          f"v3-671b from its shapes: {memory['v3_671b_ratio']:.3f}x")
    for name, c in fp8_cost.items():
        print(f"{name} vs bf16 on the batch-{ids.shape[0]} prompts: max relative logit error "
              f"{c['max_rel_logit_error']:.4f}, argmax agreement {c['argmax_agreement']:.3f}, "
              f"greedy tokens the same {c['greedy_agreement']:.3f}")
    print(f"v3-671b analytic cache (bf16): MLA {v3['mla_bytes']} B/token vs full-K/V MHA {v3['mha_bytes']} B/token "
          f"({v3['ratio']:.0f}x)")
    print(f"plot: {png}")
    return {"plot": str(png), "model": args.load or f"{args.preset} (random weights)", "dtype": args.dtype,
            "prompt_len": args.prompt_len,
            "new": args.new, "prompts": source, "rows": rows, "resident": memory, "fp8_cost": fp8_cost,
            "v3_671b_cache": v3}
