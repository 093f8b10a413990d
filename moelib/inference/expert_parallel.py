"""Expert-parallel generation under mpirun: routed experts sharded over all ranks as training shards them
(moelib.parallel.expert_parallel), attention and shared experts replicated.

Every rank runs the same request. The experts' all-to-alls need every rank in every MoE forward, so all
ranks must take the same steps: the token draws come from rank 0 (``SyncedSampler``), which keeps eos,
acceptance and the number of forwards identical everywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moelib.inference.sampling import Sampler
from moelib.model.transformer import Transformer
from moelib.parallel.expert_parallel import shard_experts
from moelib.parallel.launch import DistEnv, init


class SyncedSampler(Sampler):
    """Rank 0's draws, broadcast to every rank."""

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        out = super().categorical(probs)
        dist.broadcast(out, 0)
        return out

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        out = super().argmax(logits)
        dist.broadcast(out, 0)
        return out

    def bernoulli(self, p: torch.Tensor) -> torch.Tensor:
        out = super().bernoulli(p).to(torch.uint8)  # gloo broadcasts no bool tensors
        dist.broadcast(out, 0)
        return out.bool()


def expert_parallel(model: Transformer) -> DistEnv:
    """Join the job (mpirun, torchrun or one process) and shard ``model``'s routed experts over its ranks."""
    env = init()
    if env.world_size > 1:
        shard_experts(model)
    return env
