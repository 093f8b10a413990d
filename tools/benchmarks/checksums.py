"""Checkpoint checksums: save and load time of a preset's checkpoint with and without the per-tensor crc32.

The state is what the recipe saves: weights plus AdamW's two fp32 moments per weight. Every variant runs
``--repeats`` times in this process, alternating, and the median is reported; "without" saves with the checksum
replaced by a constant and reads with ``CheckpointReader(verify=False)``. Each read tensor is copied once, as
loading it into a model does (safetensors maps the file, so an unverified read alone touches no data).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

import moelib.train.checkpoint as ckpt
from moelib import ModelConfig
from moelib.config import PRESETS
from moelib.model import build_model


def add_args(p) -> None:
    p.add_argument("--preset", choices=list(PRESETS), default="small")
    p.add_argument("--repeats", type=int, default=3)


def variant(args) -> str:
    return args.preset


def run(args) -> dict:
    torch.set_num_threads(1)
    cfg = ModelConfig.from_preset(args.preset)
    weights = build_model(cfg, "fp32", seed=0).state_dict()
    state = {**weights, **{f"optimizer.{kind}.{k}": torch.randn_like(v) for kind in ("exp_avg", "exp_avg_sq")
                           for k, v in weights.items() if v.is_floating_point()}}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    times: dict[str, list[float]] = {"save": [], "save_unverified": [], "load": [], "load_unverified": [],
                                     "checksums_alone": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for checked in (True, False):
                root = Path(tmp) / f"{i}-{checked}"
                with mock.patch.object(ckpt, "tensor_checksum", ckpt.tensor_checksum if checked else lambda t: "0"):
                    start = time.perf_counter()
                    ckpt.save_checkpoint(root, state, cfg, 1)
                    times["save" if checked else "save_unverified"].append(time.perf_counter() - start)
            for checked in (True, False):
                start = time.perf_counter()
                reader = ckpt.CheckpointReader(Path(tmp) / f"{i}-True", verify=checked)
                for name in reader.keys():
                    reader.get(name).clone()
                times["load" if checked else "load_unverified"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for t in state.values():
                ckpt.tensor_checksum(t)
            times["checksums_alone"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"preset": args.preset, "checkpoint_gb": nbytes / 1e9, "tensors": len(state), "seconds": med,
              "save_ratio": med["save"] / med["save_unverified"], "load_ratio": med["load"] / med["load_unverified"]}
    print(f"{args.preset}: {nbytes / 1e9:.2f} GB in {len(state)} tensors, median of {args.repeats}")
    for what in ("save", "load"):
        print(f"  {what}: {med[what]:.2f} s with crc32, {med[what + '_unverified']:.2f} s without "
              f"({result[what + '_ratio']:.2f}x)")
    print(f"  crc32 of every tensor alone: {med['checksums_alone']:.2f} s "
          f"({nbytes / 1e9 / med['checksums_alone']:.2f} GB/s)")
    return result
