"""Checkpoints: a directory per step with safetensors keyed by global parameter names and a JSON
manifest; no pickle. Written under a temporary name and renamed when complete, ``latest`` last, so a
crash mid-save leaves the previous checkpoint intact.

Each rank writes the tensors only it is responsible for into its own shard; the manifest maps every
global name to its shard, so a checkpoint does not depend on the layout that wrote it. (Model weights
and router biases for now; optimizer, RNG and schedule state join the manifest with the recipe's
resume support.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moelib.config import ModelConfig
from moelib.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = "moelib-checkpoint-1"


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def save_checkpoint(root: str | os.PathLike, state: dict[str, torch.Tensor], cfg: ModelConfig, step: int,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``state`` (global names -> tensors) as checkpoint ``step`` under ``root``.

    Collective when torch.distributed has several ranks: each passes the tensors it holds; a name several
    ranks hold (replicas over DP, pipeline copies) is written once, by the lowest rank holding it, into
    that rank's shard. Rank 0 writes the manifest (with the name -> shard index), then renames the
    directory into place and updates ``latest``; before that rename nothing is visible under its name.
    """
    root = Path(root)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
        tmp.mkdir()
    names: list = [sorted(state)] if not distributed else [None] * world
    if distributed:
        dist.all_gather_object(names, sorted(state))
    owner = {}
    for r, held in enumerate(names):
        for name in held:
            owner.setdefault(name, r)
    shard = f"model-{rank:05d}-of-{world:05d}.safetensors"
    mine = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if owner[k] == rank}
    if distributed:
        dist.barrier()
    if mine:
        save_file(mine, str(tmp / shard), metadata={"format": "pt"})
    if distributed:
        dist.barrier()
    if rank == 0:
        index = {name: f"model-{r:05d}-of-{world:05d}.safetensors" for name, r in sorted(owner.items())}
        manifest = {"format": FORMAT, "step": step, "model": cfg.to_dict(), "weight_map": index, **(extra or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(f"{final.name}\n")
        os.replace(latest_tmp, root / "latest")
    if distributed:
        dist.barrier()
    return final


def resolve(path: str | os.PathLike) -> Path:
    """A step directory, or a root whose ``latest`` names one."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        return path / latest.read_text().strip()
    raise CheckpointError(f"{path}: neither a checkpoint directory (no {MANIFEST}) nor a root with a 'latest' file")


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, state dict) of a checkpoint directory or root."""
    ckpt = resolve(path)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / MANIFEST}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(manifest.get("weight_map", {}).values())):
        try:
            state.update(load_file(str(ckpt / shard)))
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{ckpt / shard}: unreadable or truncated weights ({e})") from None
    missing = [n for n in manifest.get("weight_map", {}) if n not in state]
    if missing:
        raise CheckpointError(f"{ckpt}: tensor {missing[0]} is listed in the manifest but in no shard")
    return manifest, state
