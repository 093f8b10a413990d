"""DeepSeekMoE router: fp32 scores, group-limited top-k, and the aux-loss-free selection bias.

Selection uses s + b; gate values use the unbiased s of the chosen experts. The bias is a buffer
(``e_score_correction_bias`` as in the released weights), moved by ``update_bias`` from the expert
counts of the batch just finished, never by gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moelib.config import ModelConfig
from moelib.model.recompute import linear_input_again


def group_limited_topk(biased: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                       per_group: int = 2) -> torch.Tensor:
    """Indices [N, top_k] of the best experts inside the topk_group best groups.

    A group's score is the sum of its per_group best biased scores: two in V3 (one when groups hold one
    expert), one in V2's group_limited_greedy. Dropped groups are masked with -inf, not 0: biased scores
    can be negative.
    """
    n_tokens, n_experts = biased.shape
    if n_group > 1 and topk_group < n_group:
        grouped = biased.view(n_tokens, n_group, n_experts // n_group)
        group_scores = grouped.topk(min(per_group, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        biased = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(n_tokens, n_experts)
    return biased.topk(top_k, dim=-1).indices


def node_limited_scores(biased: torch.Tensor, top_k: int, experts_per_node: int, max_nodes: int) -> torch.Tensor:
    """Biased scores with every expert outside the token's max_nodes best nodes set to -inf.

    A node holds experts_per_node consecutive experts; its score is the sum of its ceil(top_k/max_nodes)
    best biased scores (V3: "the highest K_r/M affinity scores"). Selection only: gate values still
    come from the unbiased scores of the chosen experts.
    """
    n_tokens, n_experts = biased.shape
    n_nodes = n_experts // experts_per_node
    if max_nodes >= n_nodes:
        return biased
    nodes = biased.view(n_tokens, n_nodes, experts_per_node)
    per_node = min(experts_per_node, -(-top_k // max_nodes))
    keep = nodes.topk(per_node, dim=-1).values.sum(-1).topk(max_nodes, dim=-1).indices
    mask = torch.zeros(n_tokens, n_nodes, dtype=torch.bool, device=biased.device).scatter_(1, keep, True)
    return nodes.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(n_tokens, n_experts)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        if cfg.topk_method == "greedy":  # V2-Lite: plain top-k over all experts
            self.n_group = self.topk_group = 1
        self.group_top = 1 if cfg.topk_method == "group_limited_greedy" else 2
        self.scoring_func, self.norm_topk_prob = cfg.scoring_func, cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        # The gate stays in fp32 (V3 keeps it out of FP8 and bf16).
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        # Node-limited routing, (experts_per_node, max_nodes); set by moelib.parallel.expert_parallel.
        self.node_limit: tuple[int, int] | None = None

    def scores(self, x: torch.Tensor, x_again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Scores [N, E] fp32; ``x_again`` (a function recomputing x in backward) spares keeping x."""
        again = None if x_again is None else (lambda: x_again().float())
        with torch.autocast(x.device.type, enabled=False):
            logits = linear_input_again(x.float(), self.weight.float(), again)
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor,
                x_again: Callable[[], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (indices [N, k], gate weights [N, k] fp32, scores [N, E] fp32)."""
        scores = self.scores(x, x_again)
        with torch.no_grad():
            biased = scores + self.e_score_correction_bias
            if self.node_limit is not None:
                biased = node_limited_scores(biased, self.top_k, *self.node_limit)
            indices = group_limited_topk(biased, self.top_k, self.n_group, self.topk_group, self.group_top)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, weights * self.routed_scaling_factor, scores

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, speed: float) -> None:
        """b_i += speed * sign(mean(c) - c_i) from the token counts of the finished batch."""
        counts = counts.to(self.e_score_correction_bias.device, torch.float32)
        self.e_score_correction_bias += speed * torch.sign(counts.mean() - counts)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, batch_size: int, top_k: int) -> torch.Tensor:
    """Complementary sequence-wise balance loss sum_i f_i P_i, averaged over sequences (times alpha
    by the caller). scores [B*T, E], indices [B*T, k]."""
    n_experts = scores.shape[-1]
    probs = scores / scores.sum(dim=-1, keepdim=True)
    probs = probs.view(batch_size, -1, n_experts)
    seq_len = probs.shape[1]
    with torch.no_grad():
        chosen = indices.reshape(batch_size, -1)
        hits = torch.zeros(batch_size, n_experts, device=scores.device)
        hits.scatter_add_(1, chosen, torch.ones_like(chosen, dtype=hits.dtype))
        f = hits * n_experts / (top_k * seq_len)
    return (f * probs.mean(dim=1)).sum(dim=-1).mean()


def max_violation(counts: torch.Tensor) -> float:
    """MaxVio = (max load - mean load) / mean load."""
    counts = counts.float()
    mean = counts.mean()
    return float((counts.max() - mean) / mean) if mean > 0 else 0.0
