"""Measured activation bytes kept on disk, so that a plan answers in seconds once a model has been measured.

The measurement (activations.py) runs the real layer's forward on CPU proxies: tens of seconds for V3 on a
busy machine, and the same for every plan of that model. Its result depends on the model config, the
backend, the recompute mode, the sequence length and moelib's code, so the key hashes all of them (every
``.py`` file of the package: a change anywhere the layer runs re-measures). The directory is
``$MOELIB_CACHE_DIR`` or ``~/.cache/moelib``; an unreadable or corrupt entry is measured again, and a
directory that cannot be written only costs the speed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

from moelib.config import ModelConfig
from moelib.plan.activations import layer_bytes_per_token

PACKAGE = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over moelib's Python sources (paths and contents)."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("MOELIB_CACHE_DIR") or Path.home() / ".cache" / "moelib") / "plan"


def activation_bytes(cfg: ModelConfig, backend: str, recompute: str, seq: int) -> dict[str, float]:
    """``layer_bytes_per_token(cfg, backend, recompute, seq)``, read from the disk cache when measured before."""
    key = json.dumps({"model": cfg.to_dict(), "backend": backend, "recompute": recompute, "seq": seq,
                      "code": code_digest()}, sort_keys=True)
    path = cache_dir() / f"activations-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    try:
        found = json.loads(path.read_text())
        if set(found) == {"dense", "moe"} and all(isinstance(v, float) for v in found.values()):
            return found
    except (OSError, ValueError):
        pass
    measured = layer_bytes_per_token(cfg, backend, recompute, seq)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump({k: float(v) for k, v in measured.items()}, f)
        os.replace(f.name, path)  # whole or absent: a reader never sees half a file
    except OSError:
        pass
    return measured
