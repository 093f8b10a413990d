"""Checkpoints: a directory per step with safetensors keyed by global parameter names and a JSON
manifest; no pickle. Written under a temporary name and renamed when complete, ``latest`` last, so a
crash mid-save leaves the previous checkpoint intact.

Each rank writes the tensors only it is responsible for into its own shard; the manifest maps every
global name to its shard, so a checkpoint does not depend on the layout that wrote it.

safetensors has no checksums, so the manifest records a crc32 of every tensor's bytes, computed by the
rank that writes it, and every read checks it: a flipped byte is a CheckpointError naming the tensor and
its file, never a silently different model. Checkpoints written before checksums existed load with a
warning, unverified.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moelib.config import ModelConfig
from moelib.errors import CheckpointError
from moelib.train.tokenizer import write_hf_tokenizer

MANIFEST = "manifest.json"
FORMAT = "moelib-checkpoint-1"
# Fault injection for the crash test: "STEP:SECONDS" stalls the save of STEP after its shards are written
# and before its manifest and rename, so a test can kill the job mid-write at a known point.
STALL_ENV = "MOELIB_TEST_CHECKPOINT_STALL"
# crc32 rather than a cryptographic hash: it guards against corruption, not tampering, and runs ~5x faster
# than blake2b here (BENCHMARKS.md, "Checkpoint checksums").
CHECKSUM = "crc32"


def tensor_checksum(tensor: torch.Tensor) -> str:
    """The crc32 of a CPU tensor's bytes in memory order, as 8 hex digits."""
    data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(data):08x}"


def checksum_fields(checksums: dict[str, str]) -> dict[str, Any]:
    """The manifest entries that record ``checksums`` (tensor name -> tensor_checksum)."""
    return {"checksum_algorithm": CHECKSUM, "checksums": dict(sorted(checksums.items()))}


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def save_checkpoint(root: str | os.PathLike, state: dict[str, torch.Tensor], cfg: ModelConfig, step: int,
                    extra: dict[str, Any] | None = None, tokenizer: str | os.PathLike | None = None) -> Path:
    """Write ``state`` (global names -> tensors) as checkpoint ``step`` under ``root``, with the
    ``tokenizer`` (a tokenizer.json) and the files transformers' AutoTokenizer needs beside it, if given.

    Collective when torch.distributed has several ranks: each passes the tensors it holds; a name several
    ranks hold (replicas over DP, pipeline copies) is written once, by the lowest rank holding it, into
    that rank's shard. Rank 0 writes the manifest (with the name -> shard index), then renames the
    directory into place and updates ``latest``; before that rename nothing is visible under its name.
    """
    root = Path(root)
    if tokenizer is not None and not Path(tokenizer).is_file():  # every rank gets the same path: all refuse
        raise CheckpointError(f"{tokenizer}: the tokenizer to save with checkpoint {step} does not exist")
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)  # before this save's own directory exists, so never a part of it
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
    sums = [{k: tensor_checksum(v) for k, v in mine.items()}]
    _maybe_stall(step)
    if distributed:  # also the barrier: rank 0 hears from every rank after its shard is written
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(sums[0], gathered, dst=0)
        sums = gathered
    if rank == 0:
        index = {name: f"model-{r:05d}-of-{world:05d}.safetensors" for name, r in sorted(owner.items())}
        merged = {name: crc for part in sums for name, crc in part.items()}
        manifest = {"format": FORMAT, "step": step, "model": cfg.to_dict(), "weight_map": index,
                    **checksum_fields(merged), **(extra or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if tokenizer is not None:
            write_hf_tokenizer(tokenizer, tmp, cfg.max_position_embeddings)
        # Re-saving a step: the old copy steps aside (resolve() falls back to it while ``final`` is missing),
        # the new one moves in, and only then is the old one deleted.
        aside = _aside(final)
        if final.exists():
            os.rename(final, aside)
        os.rename(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(f"{final.name}\n")
        os.replace(latest_tmp, root / "latest")
        shutil.rmtree(aside, ignore_errors=True)
    if distributed:
        dist.barrier()
    return final


def _aside(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def _remove_stale(root: Path) -> None:
    """Remove what a killed save left behind: partial ``.iter_*.tmp`` directories, and a step's previous copy
    set aside by a re-save (moved back if the new copy never arrived). Safe because a job saves one step at a
    time and only its rank 0 creates these, so none belongs to a save in progress."""
    for tmp in root.glob(".iter_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    for aside in root.glob(".iter_*.old"):
        final = root / aside.name[1:-len(".old")]
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, final)


def _maybe_stall(step: int) -> None:
    spec = os.environ.get(STALL_ENV)
    if spec and int(spec.split(":")[0]) == step:
        import time

        time.sleep(float(spec.split(":")[1]))


def resolve(path: str | os.PathLike) -> Path:
    """A step directory, or a root whose ``latest`` names one."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        step = path / latest.read_text().strip()
        # Mid re-save of that step, its old copy is set aside for an instant (save_checkpoint).
        return step if step.exists() or not _aside(step).is_dir() else _aside(step)
    raise CheckpointError(f"{path}: neither a checkpoint directory (no {MANIFEST}) nor a root with a 'latest' file")


class CheckpointReader:
    """Reads tensors of a checkpoint by name, one at a time (each rank takes only what it holds), each
    checked against its checksum in the manifest unless ``verify`` is False."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = resolve(path)
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path / MANIFEST}: unreadable manifest ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise CheckpointError(f"{self.path / MANIFEST}: format {self.manifest.get('format')!r}, "
                                  f"expected {FORMAT!r}")
        self.weight_map: dict[str, str] = self.manifest.get("weight_map", {})
        self.checksums: dict[str, str] | None = self.manifest.get("checksums") if verify else None
        if verify and self.checksums is None:
            warnings.warn(f"{self.path / MANIFEST}: no tensor checksums (written before moelib recorded them); "
                          "its tensors load unverified", stacklevel=2)
        elif verify and self.manifest.get("checksum_algorithm") != CHECKSUM:
            raise CheckpointError(f"{self.path / MANIFEST}: checksum_algorithm "
                                  f"{self.manifest.get('checksum_algorithm')!r}, expected {CHECKSUM!r}")
        self._open: dict[str, Any] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name} is not in the checkpoint")
        shard = self.weight_map[name]
        try:
            if shard not in self._open:
                self._open[shard] = safe_open(str(self.path / shard), framework="pt")
            tensor = self._open[shard].get_tensor(name)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{self.path / shard}: unreadable or truncated shard ({e})") from None
        self.verify(name, tensor)
        return tensor

    def verify(self, name: str, tensor: torch.Tensor) -> None:
        """Raise CheckpointError (naming the tensor and its shard) unless ``tensor`` has the bytes the
        manifest recorded for ``name``; a no-op for checkpoints without checksums."""
        if self.checksums is None:
            return
        shard = self.path / self.weight_map[name]
        want = self.checksums.get(name)
        if want is None:
            raise CheckpointError(f"{shard}: tensor {name} has no checksum in {MANIFEST}")
        got = tensor_checksum(tensor)
        if got != want:
            raise CheckpointError(f"{shard}: tensor {name} is corrupt ({CHECKSUM} {got}, the manifest recorded "
                                  f"{want})")


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(manifest, the whole state dict) of a checkpoint directory or root."""
    reader = CheckpointReader(path)
    return reader.manifest, {name: reader.get(name) for name in reader.keys()}


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest step directories (never the one ``latest`` names)."""
    root = Path(root)
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    steps = sorted(p for p in root.glob("iter_*") if p.is_dir() and (p / MANIFEST).is_file())
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
