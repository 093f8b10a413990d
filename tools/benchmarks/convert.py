"""Checkpoint conversion: GB/s and peak RSS of streaming export/import on a synthetic multi-GB checkpoint.

A synthetic moelib checkpoint of about --size-gb (fp32, random weights and router biases, written as four
"rank" shards like a 4-rank run) is built in a temporary directory; then tools/convert_ckpt.py runs in a child
process for each step (export fp32 / bf16 / fp8, import of the bf16 export), and the child's peak RSS is its
VmHWM, polled. Peers measured in the same run: copying the input shards (the disk bound for GB/s), and a
naive conversion that loads the whole model with safetensors.torch.load_file, casts it to bf16 and saves it
with save_file (the memory a non-streaming converter needs). Each step starts after os.sync(); the input is
read back from the page cache (caches are not dropped), so reads are cheap and writes meet the disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moelib import ModelConfig
from moelib.convert import ShardWriter, expected_shapes, parse_size
from moelib.train.checkpoint import FORMAT, MANIFEST

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "tools" / "convert_ckpt.py"
RANKS = 4
NAIVE = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
src, out = Path(sys.argv[1]), Path(sys.argv[2])
state = {}
for f in sorted(src.glob("*.safetensors")):
    state.update(load_file(str(f)))
save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(out / "model.safetensors"))
"""


def add_args(p) -> None:
    p.add_argument("--size-gb", type=float, default=3.0, help="fp32 size of the synthetic checkpoint (GB, 1e9)")
    p.add_argument("--max-shard-size", default="1GB", help="output shard limit passed to convert_ckpt.py")
    p.add_argument("--dtypes", default="fp32,bf16,fp8", help="export dtypes to measure")
    p.add_argument("--workdir", default=None, help="where the temporary files go (default: the system temp dir)")
    p.add_argument("--no-naive", action="store_true", help="skip the whole-model-in-memory peer")


def synthetic_config(size_gb: float) -> ModelConfig:
    """A V3-shaped model (128x128-divisible FP8 dims) with as many layers as fit in size_gb of fp32."""
    base = dict(vocab_size=32768, hidden_size=1024, first_k_dense_replace=1, intermediate_size=2816,
                num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=64,
                v_head_dim=64, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6,
                moe_intermediate_size=512, n_group=8, topk_group=4, num_nextn_predict_layers=1)
    layers = 2
    while True:
        cfg = ModelConfig.from_preset("tiny", **base, num_hidden_layers=layers + 1)
        counts = cfg.param_counts()
        if 4 * (counts["total"] + counts["mtp"]) > size_gb * 1e9:
            return ModelConfig.from_preset("tiny", **base, num_hidden_layers=layers)
        layers += 1


def build_checkpoint(cfg: ModelConfig, root: Path) -> int:
    """Write the synthetic checkpoint tensor by tensor (never the whole model in memory); returns its bytes."""


    step = root / "iter_0000001"
    step.mkdir(parents=True)
    shapes = expected_shapes(cfg)
    names = sorted(shapes)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for r in range(RANKS):
        fname = f"model-{r:05d}-of-{RANKS:05d}.safetensors"
        mine = names[r::RANKS]
        writer = ShardWriter(step / fname, [(n, torch.float32, shapes[n]) for n in mine])
        for n in mine:
            scale = 0.1 if n.endswith("e_score_correction_bias") else 0.02
            writer.write(torch.randn(shapes[n], generator=g) * scale)
            weight_map[n] = fname
        writer.close()
    manifest = {"format": FORMAT, "step": 1, "model": cfg.to_dict(), "weight_map": weight_map}
    (step / MANIFEST).write_text(json.dumps(manifest) + "\n")
    (root / "latest").write_text(f"{step.name}\n")
    return sum(p.stat().st_size for p in step.glob("*.safetensors"))


def run_child(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of a child process. The peak is the child's VmHWM, polled: ru_maxrss
    would also count the RSS of this (large) process, which a forked child inherits until it execs."""
    os.sync()  # every measurement starts with no dirty pages of the previous one still being written back
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    status, peak = Path(f"/proc/{proc.pid}/status"), 0
    while proc.poll() is None:
        try:
            peak = max(peak, next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines()
                                  if line.startswith("VmHWM:")))
        except (OSError, StopIteration):  # exiting: the last reading stands (VmHWM only grows)
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err[-2000:]}")
    return seconds, peak


def dir_stats(path: Path) -> tuple[int, int]:
    sizes = [p.stat().st_size for p in path.rglob("*.safetensors")]
    return sum(sizes), max(sizes)


def measure(what: str, cmd: list[str], src_bytes: int, out: Path) -> dict:
    seconds, rss = run_child(cmd)
    out_bytes, largest = dir_stats(out)
    return {"what": what, "seconds": seconds, "in_gb": src_bytes / 1e9, "out_gb": out_bytes / 1e9,
            "in_gb_per_s": src_bytes / 1e9 / seconds, "peak_rss_gb": rss / 1e9, "largest_shard_gb": largest / 1e9,
            "rss_over_largest_shard": rss / largest}


def run(args) -> dict:
    parse_size(args.max_shard_size)  # a bad size fails here, before minutes of building
    cfg = synthetic_config(args.size_gb)
    work = Path(tempfile.mkdtemp(prefix="moelib-convert-bench-", dir=args.workdir))
    rows = []
    try:
        ckpt = work / "ckpt"
        t0 = time.perf_counter()
        src_bytes = build_checkpoint(cfg, ckpt)
        print(f"synthetic checkpoint: {src_bytes / 1e9:.2f} GB in {RANKS} shards, {cfg.num_hidden_layers} layers "
              f"+ MTP ({time.perf_counter() - t0:.0f} s to build)", flush=True)
        step = ckpt / "iter_0000001"
        copy = work / "copy"
        os.sync()
        t0 = time.perf_counter()
        shutil.copytree(step, copy)
        copy_s = time.perf_counter() - t0
        shutil.rmtree(copy)
        py = sys.executable
        for dtype in args.dtypes.split(","):
            out = work / f"hf-{dtype}"
            rows.append(measure(f"export {dtype}", [py, str(CLI), "export", "--load", str(ckpt), "--save", str(out),
                                                    "--dtype", dtype, "--max-shard-size", args.max_shard_size,
                                                    "--no-progress"], src_bytes, out))
            print(rows[-1], flush=True)
            if dtype != "bf16":
                shutil.rmtree(out)
        hf = work / "hf-bf16"
        if hf.exists():
            hf_bytes = dir_stats(hf)[0]
            out = work / "back"
            rows.append(measure("import bf16 -> fp32", [py, str(CLI), "import", "--load", str(hf), "--save", str(out),
                                                        "--max-shard-size", args.max_shard_size, "--no-progress"],
                                hf_bytes, out))
            print(rows[-1], flush=True)
            shutil.rmtree(out)
        naive = None
        if not args.no_naive:
            out = work / "naive"
            out.mkdir()
            naive = measure("naive export bf16 (whole model in memory)", [py, "-c", NAIVE, str(step), str(out)],
                            src_bytes, out)
            rows.append(naive)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'conversion':44s} {'in GB':>6s} {'out GB':>6s} {'s':>6s} {'GB/s in':>8s} {'vs copy':>8s} "
          f"{'peak RSS':>9s} {'largest shard':>13s} {'RSS/shard':>9s}")
    copy_rate = src_bytes / 1e9 / copy_s
    for r in rows:
        r["vs_copy"] = r["in_gb_per_s"] / copy_rate
        print(f"{r['what']:44s} {r['in_gb']:6.2f} {r['out_gb']:6.2f} {r['seconds']:6.1f} {r['in_gb_per_s']:8.2f} "
              f"{r['vs_copy']:8.2f} {r['peak_rss_gb']:8.2f}G {r['largest_shard_gb']:12.2f}G "
              f"{r['rss_over_largest_shard']:9.2f}")
    print(f"{'peer: copy the input shards':44s} {src_bytes / 1e9:6.2f} {src_bytes / 1e9:6.2f} {copy_s:6.1f} "
          f"{copy_rate:8.2f}")
    return {"size_gb": src_bytes / 1e9, "max_shard_size": args.max_shard_size, "model": cfg.to_dict(),
            "copy_gb_per_s": copy_rate, "runs": rows,
            "note": "input read from the page cache; peak RSS = the converter child's VmHWM; os.sync() before each"}
