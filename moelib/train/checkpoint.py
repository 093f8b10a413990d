"""Checkpoints: a directory per step with safetensors keyed by global parameter names and a JSON
manifest; no pickle. Written under a temporary name and renamed when complete, ``latest`` last, so a
crash mid-save leaves the previous checkpoint intact.

This is the model-only form the single-process trainer writes; optimizer state, RNG and schedule
state join the manifest with the distributed recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moelib.config import ModelConfig
from moelib.errors import CheckpointError

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FORMAT = "moelib-checkpoint-1"


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def save_checkpoint(root: str | os.PathLike, model: torch.nn.Module, cfg: ModelConfig, step: int,
                    extra: dict[str, Any] | None = None) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        manifest = {"format": FORMAT, "step": step, "model": cfg.to_dict(), **(extra or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(f"{final.name}\n")
    os.replace(latest_tmp, root / "latest")
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
    try:
        state = load_file(str(ckpt / WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{ckpt / WEIGHTS}: unreadable or truncated weights ({e})") from None
    return manifest, state
