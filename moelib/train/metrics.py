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
    """Training FLOPs per token: 6 x activated matmul parameters (embedding lookups excluded; head and, if
    run, MTP blocks included) plus the causal attention scores and values."""
    c = cfg.param_counts()
    dense = c["activated"] - c["embedding"]
    layers = cfg.num_hidden_layers
    if with_mtp and cfg.num_nextn_predict_layers:
        experts = cfg.n_routed_experts + cfg.n_shared_experts
        idle_experts = (experts - cfg.num_experts_per_tok - cfg.n_shared_experts) * c["expert"]
        dense += c["mtp"] - cfg.num_nextn_predict_layers * idle_experts + cfg.num_nextn_predict_layers * c["head"]
        layers += cfg.num_nextn_predict_layers
    attention = 6 * layers * cfg.num_attention_heads * seq_len * (cfg.qk_head_dim + cfg.v_head_dim) / 2
    return 6 * dense + attention


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
