"""Learning-rate schedule: linear warm-up, then cosine decay to min_lr."""

from __future__ import annotations

import math

from moelib.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step ``step`` (0-based)."""
    if step < cfg.lr_warmup_iters:
        return cfg.lr * (step + 1) / cfg.lr_warmup_iters
    span = max(cfg.train_iters - cfg.lr_warmup_iters, 1)
    progress = min((step - cfg.lr_warmup_iters) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
