"""Expert-load statistics the trainer reads after each step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelib.model.router import max_violation
from moelib.model.transformer import Transformer


@dataclass
class LoadStats:
    counts: dict[str, torch.Tensor]   # per MoE layer: tokens routed to each expert this batch
    max_vio: dict[str, float]         # per MoE layer

    @property
    def mean_max_vio(self) -> float:
        return sum(self.max_vio.values()) / len(self.max_vio) if self.max_vio else 0.0


def collect_load(model: Transformer, reset: bool = True) -> LoadStats:
    counts, vio = {}, {}
    for name, moe in model.moe_layers().items():
        c = moe.load_counts.clone()
        counts[name], vio[name] = c, max_violation(c)
        if reset:
            moe.load_counts.zero_()
    return LoadStats(counts, vio)
