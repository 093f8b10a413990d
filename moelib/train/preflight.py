"""Start-up checks: whatever a run will write later is tried now, on every rank, so a bad path or a full
disk fails in the first seconds instead of after hours of training; and a run never writes into the
checkpoints of another run.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from moelib.config import ModelConfig, TrainConfig
from moelib.errors import ConfigError

MANIFEST = "manifest.json"  # moelib.train.checkpoint's name; read here without loading any tensor


def checkpoint_bytes(model: ModelConfig, train: TrainConfig) -> int:
    """Estimated size of one checkpoint: fp32 weights, both AdamW moments, the EMA when kept."""
    counts = model.param_counts()
    moment = 2 if train.moment_dtype == "bf16" else 4
    return (counts["total"] + counts["mtp"]) * (4 + 2 * moment + (4 if train.ema_decay > 0 else 0))


def check_save_dir(path: str | os.PathLike, needed: int) -> None:
    """``--save`` can be created, written and holds ``needed`` more bytes (checked with a probe file)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"moelib")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--save {path}: cannot write there ({e.strerror or e})") from None
    free = shutil.disk_usage(path).free
    if free < needed:
        raise ConfigError(f"--save {path}: {free / 2**20:,.0f} MiB free, but one checkpoint needs about "
                          f"{needed / 2**20:,.0f} MiB")


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """A file the run appends to later (``--log-json``) can be opened for appending now."""
    try:
        if Path(path).parent.exists() and not Path(path).parent.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot open for appending ({e.strerror or e})") from None


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """A directory the run writes into later (``--tensorboard-dir``) can be created and written now."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


def check_device(backend: str) -> None:
    """fp8-triton without a GPU would run its kernels in Triton's interpreter, thousands of times slower."""
    if backend == "fp8-triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("--precision fp8-triton needs a CUDA GPU; on CPU use fp8-emulated (same numerics)")


def check_intervals(**flags: int) -> None:
    """Interval and count flags are never negative (0 means off)."""
    for name, value in flags.items():
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be 0 (off) or positive, got {value}")


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """``field: A vs B`` for every (nested) field where two config dicts differ, in key order."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key} {x!r} vs {y!r}")
    return out


def latest_manifest(save: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest ``latest`` names under ``save``, or None when there is no checkpoint there."""
    latest = Path(save) / "latest"
    if not latest.is_file():
        return None
    try:
        return json.loads((Path(save) / latest.read_text().strip() / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged checkpoint is --load's business; it is not another run's


def check_save_owner(save: str | os.PathLike, run: dict[str, Any], resumes_it: bool) -> None:
    """Refuse to write into ``save`` when it holds checkpoints of another run: one whose recorded run config
    (``run``: model and train sections) differs, or any run at all unless this one resumes from it."""
    manifest = latest_manifest(save)
    if manifest is None or resumes_it:
        return
    theirs = manifest.get("run", {"model": manifest.get("model", {})})
    diff = differences({k: theirs.get(k) for k in run}, run)
    what = (f"a run with another config ({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''})" if diff
            else "this config's run")
    raise ConfigError(f"--save {save} already holds the checkpoints of {what}, up to step {manifest.get('step')}; "
                      f"resume it with --load {save}, or pass another --save")
