"""Metrics the trainer reports: expert load, model FLOPs per token, a measured matmul peak."""

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
        """MaxVio averaged over the layers that routed tokens: a layer that ran on nothing (the MTP module in
        an evaluation pass without its loss) has no load to be unbalanced, and counting it as 0 would flatter
        the mean."""
        vio = [self.max_vio[name] for name, c in self.counts.items() if c.sum() > 0]
        return sum(vio) / len(vio) if vio else 0.0


def collect_load(model: Transformer, reset: bool = True) -> LoadStats:
    counts, vio = {}, {}
    for name, moe in model.moe_layers().items():
        c = moe.load_counts.clone()
        counts[name], vio[name] = c, max_violation(c)
        if reset:
            moe.load_counts.zero_()
    return LoadStats(counts, vio)


def model_flops_per_token(cfg, seq_len: int, with_mtp: bool = True) -> float:
    """Training FLOPs per token: 3 x the forward FLOPs of every block (ModelConfig.flops_per_token: 2 x
    activated matmul parameters plus the causal attention core; embedding lookups excluded; head and, if
    run, MTP modules included)."""
    f = cfg.flops_per_token(seq_len)
    forward = cfg.first_k_dense_replace * f["dense"] + cfg.num_moe_layers * f["moe"] + f["head"]
    if with_mtp:
        forward += cfg.num_nextn_predict_layers * f["mtp"]
    return 3 * forward


def measure_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 8,
                         device: torch.device | str = "cpu") -> float:
    """Dense matmul FLOP/s of this device in ``dtype``: the ceiling MFU is measured against when the user
    gives no peak."""
    import time

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)
