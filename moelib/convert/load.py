"""A model for inference from either format."""

from __future__ import annotations

import os
from pathlib import Path

from moelib.convert.read import open_hf, open_moelib
from moelib.train.checkpoint import MANIFEST


def load_model(path: str | os.PathLike):
    """A CPU model in eval mode from a moelib checkpoint (step directory or root) or an HF DeepSeek-V3/V2
    directory (without the MTP modules when no shard holds them); calling it on input_ids [B, T] returns the
    main model's logits [B, T, vocab]."""
    from moelib.model.transformer import build_model

    path = Path(path)
    if (path / "config.json").is_file() and not (path / MANIFEST).is_file():
        cfg, shards, units = open_hf(path)
        try:
            state = {u.outputs[0][0]: u.make()[0] for u in units}
        finally:
            shards.close()
    else:
        _, cfg, shards, source = open_moelib(path)
        try:
            state = {name: shards.get(stored) for name, stored in source.items()}
        finally:
            shards.close()
    model = build_model(cfg, "fp32", seed=0)
    model.load_state_dict(state)
    return model.eval()
