"""Pieces shared by the mesh / gradient-sync / ZeRO workers: a tiny model, a reference expert-parallel
dispatcher, a 1F1B-style stage view, and the entry point that turns user errors into one line."""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from moelib.config import ModelConfig
from moelib.errors import MoelibError
from moelib.model.dispatch import Dispatcher
from moelib.model.moe import MoE
from moelib.parallel import launch


def tiny_cfg() -> ModelConfig:
    """4 decoder layers (1 dense) + 1 MTP depth, 8 experts in 2 groups, top-2: fast on 2 cores."""
    return ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, first_k_dense_replace=1,
                       intermediate_size=48, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                       qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                       n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16, n_group=2,
                       topk_group=1, num_nextn_predict_layers=1, max_position_embeddings=64)


def main(fn, timeout_s: float = 60.0) -> None:
    """Run ``fn(env)`` in a joined job. A moelib error (bad layout, missing MPI) prints one line on rank 0
    and exits 2 on every rank; anything else is a bug and keeps its traceback (exit 1)."""
    try:
        # gloo even where CUDA exists: these are CPU tests, and several ranks may share one GPU.
        env = launch.init(backend="gloo", timeout_s=timeout_s)
        fn(env)
    except MoelibError as e:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    launch.shutdown()


def result(**fields) -> None:
    """Rank 0 prints one RESULT line the pytest side parses (so a failure shows the numbers)."""
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(fields), flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) if b.numel() else 0.0


def world_max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


# -- a reference expert-parallel dispatcher ---------------------------------------------------------------


class _AllGather(torch.autograd.Function):
    """Concatenate every group member's rows; backward hands each member the summed gradient of its rows."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        n = grad.shape[0] // dist.get_world_size(ctx.group)
        r = dist.get_rank(ctx.group)
        return grad[r * n: (r + 1) * n], None


class _SumToOwn(torch.autograd.Function):
    """Sum a [members × rows] tensor over the group and keep this member's rows; backward all-gathers."""

    @staticmethod
    def forward(ctx, full, group):
        ctx.group = group
        full = full.contiguous().clone()
        dist.all_reduce(full, group=group)
        n = full.shape[0] // dist.get_world_size(group)
        r = dist.get_rank(group)
        return full[r * n: (r + 1) * n]

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(ctx.group))]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts), None


class GatherDispatcher(Dispatcher):
    """Expert parallelism the simple way, as an independent check of the gradient scaling: every EP rank
    gathers all tokens of its EP group, computes the pairs routed to its own experts, and the partial
    outputs are summed back to each token's home rank. Its gradients have the all-to-all's semantics (an
    expert's gradient sums every group member's loss). Needs equal token counts on the group's ranks."""

    def __init__(self, group, num_local: int, offset: int):
        self.group, self.num_local, self.offset = group, num_local, offset

    def dispatch(self, x, indices, weights, num_experts):
        top_k = indices.shape[1]
        xs, ws = _AllGather.apply(x, self.group), _AllGather.apply(weights, self.group)
        ids = [torch.empty_like(indices) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(ids, indices.contiguous(), group=self.group)
        flat = torch.cat(ids).reshape(-1)
        local = ((flat >= self.offset) & (flat < self.offset + self.num_local)).nonzero().squeeze(1)
        order = local[torch.argsort(flat[local], stable=True)]
        counts = torch.bincount(flat[order] - self.offset, minlength=self.num_local)
        # row_weights: each row's gate value, which the experts fold into their SwiGLU output.
        state = SimpleNamespace(order=order, rows=xs.shape[0], top_k=top_k, row_weights=ws.reshape(-1)[order])
        return xs[order // top_k], counts, state

    def combine(self, y, state):
        full = y.new_zeros(state.rows, y.shape[1]).index_add(0, state.order // state.top_k, y)
        return _SumToOwn.apply(full, self.group)


def shard_for_test(model: nn.Module, ep_group, ep_rank: int, ep: int) -> None:
    """Keep experts [ep_rank·E/EP, (ep_rank+1)·E/EP) of every MoE and reach the rest through the gather
    dispatcher; load_counts become [E_local] as with moelib.parallel.expert_parallel.shard_experts."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        local = moe.num_experts // ep
        lo = ep_rank * local
        experts = moe.experts
        for name in ("gate_up_proj", "down_proj"):
            setattr(experts, name, nn.Parameter(getattr(experts, name).detach()[lo: lo + local].clone()))
        experts.num_experts, experts.expert_offset = local, lo
        moe.dispatcher = GatherDispatcher(ep_group, local, lo)
        moe.load_counts = moe.load_counts.new_zeros(local)


def stage_view(model: nn.Module, stage: int, num_stages: int) -> nn.Module:
    """The parts a 1F1B pipeline stage would own, under their global names: contiguous layers, the
    embedding on the first stage, norm, head and MTP on the last."""
    view = nn.Module()
    keys = list(model.layers)
    per = len(keys) // num_stages
    view.layers = nn.ModuleDict({k: model.layers[k] for k in keys[stage * per: (stage + 1) * per]})
    if stage == 0:
        view.embed_tokens = model.embed_tokens
    if stage == num_stages - 1:
        view.norm, view.lm_head, view.mtp = model.norm, model.lm_head, model.mtp
    return view
