"""Convert between moelib checkpoints and the Hugging Face DeepSeek-V3 / V2 layouts (transformers, vLLM, SGLang).

    python tools/convert_ckpt.py export --load checkpoints/v3_pretrain --save hf/tiny --dtype bf16
    python tools/convert_ckpt.py export --load CKPT --save hf/tiny-fp8 --dtype fp8     # the released FP8 layout
    python tools/convert_ckpt.py import --load hf/tiny --save checkpoints/from_hf     # then: v3_pretrain --load
    python tools/convert_ckpt.py import --load DeepSeek-V2-Lite --save checkpoints/v2-lite   # model_type deepseek_v2

Tensors stream shard by shard: host memory stays near a few copies of the largest tensor, never the model.
FP8 is (de)quantised on CPU. The MTP modules and the router biases (e_score_correction_bias, fp32) travel
both ways. moelib checkpoints are layout-free (the manifest keys tensors by global name, whatever PP/EP
layout wrote them), so there is no reshard command: any checkpoint exports, and an imported one loads
under any layout. Output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelib.convert import DEFAULT_SEED, EXPORT_DTYPES, export_hf, import_hf, parse_size  # noqa: E402
from moelib.parallel.report import run_main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="convert_ckpt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="moelib checkpoint (any layout) -> Hugging Face DeepSeek-V3 directory")
    e.add_argument("--load", required=True, help="a checkpoint step directory, or a --save root with 'latest'")
    e.add_argument("--save", required=True, help="the HF directory to create")
    e.add_argument("--dtype", choices=EXPORT_DTYPES, default="bf16",
                   help="fp8: float8_e4m3fn weights with 128x128-block weight_scale_inv, as the release")
    e.add_argument("--ema", action="store_true", help="export the EMA weights (ema.* tensors) instead")
    i = sub.add_parser("import", help="Hugging Face DeepSeek-V3 directory -> moelib checkpoint (step 0)")
    i.add_argument("--load", required=True, help="an HF directory: config.json and safetensors shards")
    i.add_argument("--save", required=True, help="the checkpoint root to create (recipes' --load takes it)")
    i.add_argument("--no-mtp", action="store_true", help="leave the MTP modules out of the checkpoint")
    i.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help="initialises MTP modules config.json declares but no shard holds, as a new run with this "
                        f"--seed would (default {DEFAULT_SEED}); transformers' save_pretrained never stores them")
    for s in (e, i):
        s.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
        s.add_argument("--overwrite", action="store_true", help="replace --save if it exists and is not empty")
        s.add_argument("--no-progress", action="store_true", help="no progress bar")
        s.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.showwarning = lambda message, *_, **__: print(f"convert_ckpt: warning: {message}", file=sys.stderr)
    # The work is per-tensor casts and quantisation between reads and writes; on busy cores OpenMP's
    # barriers made 2 threads 5-15x slower than 1 (see BENCHMARKS.md), so one thread is the default.
    torch.set_num_threads(max(1, args.threads))
    size = parse_size(args.max_shard_size)
    if args.command == "export":
        out = export_hf(args.load, args.save, args.dtype, args.ema, size, args.overwrite, not args.no_progress)
    else:
        out = import_hf(args.load, args.save, size, args.overwrite, not args.no_progress, args.no_mtp, args.seed)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "convert_ckpt"))
