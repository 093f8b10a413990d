"""The process mesh: world = PP × DP, expert parallelism (EP) inside DP, no tensor parallelism.

Rank layout (DP innermost, EP innermost inside DP):

    rank    = pp_rank · DP + dp_rank
    dp_rank = edp_rank · EP + ep_rank

so an EP group is EP consecutive ranks: its all-to-all stays on one node whenever EP ≤ ranks per node
(mpirun fills nodes with consecutive ranks). Groups (each a torch.distributed process group):

    pp   PP ranks with the same dp_rank       pipeline send/recv, DualPipe mirrors
    dp   DP ranks with the same pp_rank       dense gradients, router load counts
    ep   EP ranks with the same (pp, edp)     token all-to-all; experts sharded over it
    edp  DP/EP ranks with the same (pp, ep)   expert gradients; the same experts replicated over it

Example, world 16 = PP 2 × DP 8 with EP 4: ep groups [0-3] [4-7] [8-11] [12-15], edp groups [0,4] [1,5]
..., dp groups [0-7] [8-15], pp groups [0,8] [1,9] ....
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.distributed as dist

from moelib.config import ModelConfig, ParallelConfig

GROUP_KINDS = ("pp", "dp", "ep", "edp")


@dataclass(frozen=True)
class Coords:
    pp: int
    dp: int
    ep: int
    edp: int


def coords_of(rank: int, world_size: int, pp: int, ep: int) -> Coords:
    dp = world_size // pp
    dp_rank = rank % dp
    return Coords(pp=rank // dp, dp=dp_rank, ep=dp_rank % ep, edp=dp_rank // ep)


def rank_of(pp_rank: int, dp_rank: int, dp: int) -> int:
    return pp_rank * dp + dp_rank


def group_ranks(world_size: int, pp: int, ep: int) -> dict[str, list[list[int]]]:
    """Every group of each kind as a list of global ranks, in a fixed order (the order the groups are
    created in, which torch requires to be the same on every rank). Pure: no communication."""
    dp = world_size // pp
    edp = dp // ep
    r = lambda p, e, d: rank_of(p, d * ep + e, dp)  # (pp, ep, edp) -> global rank
    return {
        "pp": [[rank_of(p, d, dp) for p in range(pp)] for d in range(dp)],
        "dp": [[rank_of(p, d, dp) for d in range(dp)] for p in range(pp)],
        "ep": [[r(p, e, d) for e in range(ep)] for p in range(pp) for d in range(edp)],
        "edp": [[r(p, e, d) for d in range(edp)] for p in range(pp) for e in range(ep)],
        # The EP ranks again, for the backward all-to-alls: the overlapped schedule issues them from a
        # second thread, and collectives of one group must be issued in the same order on every rank.
        "ep_grad": [[r(p, e, d) for e in range(ep)] for p in range(pp) for d in range(edp)],
    }


class Mesh:
    """This rank's place in the layout and its process groups.

    Building a Mesh is collective: every rank must build it with the same config (torch.distributed
    groups are created by all ranks in the same order). The config is validated first, so a bad layout
    fails identically on every rank, before any collective could hang on it.
    """

    def __init__(self, cfg: ParallelConfig, model_cfg: ModelConfig | None = None):
        if not dist.is_initialized():
            raise RuntimeError("Mesh needs torch.distributed; call moelib.parallel.init() first")
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        cfg.validate(self.world_size, model_cfg)
        self.cfg = cfg
        self.pp, self.ep = cfg.pp, cfg.ep
        self.dp = self.world_size // self.pp
        self.edp = self.dp // self.ep
        c = coords_of(self.rank, self.world_size, self.pp, self.ep)
        self.pp_rank, self.dp_rank, self.ep_rank, self.edp_rank = c.pp, c.dp, c.ep, c.edp
        self.groups: dict[str, dist.ProcessGroup] = {}
        self.ranks: dict[str, list[int]] = {}
        for kind, all_groups in group_ranks(self.world_size, self.pp, self.ep).items():
            for ranks in all_groups:
                group = new_group(ranks)  # every rank creates every group, in the same order
                if self.rank in ranks:
                    self.groups[kind], self.ranks[kind] = group, ranks

    # -- groups -------------------------------------------------------------------------------------

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.groups["pp"]

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.groups["dp"]

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.groups["ep"]

    @property
    def edp_group(self) -> dist.ProcessGroup:
        return self.groups["edp"]

    @property
    def ep_grad_group(self) -> dist.ProcessGroup:
        return self.groups["ep_grad"]

    # -- neighbours and placement --------------------------------------------------------------------

    def global_rank(self, pp_rank: int | None = None, dp_rank: int | None = None) -> int:
        """The global rank at (pp_rank, dp_rank), each defaulting to this rank's own."""
        pp_rank = self.pp_rank if pp_rank is None else pp_rank
        dp_rank = self.dp_rank if dp_rank is None else dp_rank
        return rank_of(pp_rank, dp_rank, self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def pp_prev(self) -> int | None:
        """Global rank of the previous pipeline rank (same dp_rank), None on the first."""
        return None if self.is_first_stage else self.global_rank(self.pp_rank - 1)

    @property
    def pp_next(self) -> int | None:
        """Global rank of the next pipeline rank (same dp_rank), None on the last."""
        return None if self.is_last_stage else self.global_rank(self.pp_rank + 1)

    @property
    def pp_mirror(self) -> int:
        """Global rank of pipeline rank PP-1-r: DualPipe's partner, holding this rank's stages mirrored."""
        return self.global_rank(self.pp - 1 - self.pp_rank)

    def expert_range(self, n_routed_experts: int) -> range:
        """Global ids of the routed experts this rank holds: a contiguous block, ep_rank-th of EP."""
        per_rank = n_routed_experts // self.ep
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    def node_of(self, rank: int) -> int:
        """Node index of a global rank: consecutive ranks fill nodes of ``ranks_per_node``."""
        rpn = self.cfg.ranks_per_node
        return 0 if rpn is None else rank // rpn

    def ep_node(self, ep_rank: int) -> int:
        """Node index, counted inside this EP group, of the group's ep_rank-th member."""
        return self.node_of(self.ranks["ep"][ep_rank]) - self.node_of(self.ranks["ep"][0])

    @property
    def nodes_per_ep_group(self) -> int:
        rpn = self.cfg.ranks_per_node
        return 1 if rpn is None else max(1, self.ep // rpn)

    def describe(self) -> str:
        return (f"PP {self.pp} x DP {self.dp} (EP {self.ep} x EDP {self.edp}), {self.cfg.pipeline_schedule}, "
                f"{self.cfg.microbatches} micro-batches")

    def __repr__(self) -> str:
        return (f"Mesh(rank={self.rank}, pp={self.pp_rank}/{self.pp}, dp={self.dp_rank}/{self.dp}, "
                f"ep={self.ep_rank}/{self.ep}, edp={self.edp_rank}/{self.edp})")


def new_group(ranks: list[int]) -> dist.ProcessGroup:
    """A process group of ``ranks``; every rank of the world must call this for every group, in the same
    order; the world group is reused. Not ``use_local_synchronization``: torch then names a group by its
    ranks and by how many groups each member has joined so far, so after groups some members joined and
    others did not (grad_sync's copies of tied weights), a later group's members disagree on its name and
    wait for each other forever (a second ParallelTrainer in one process hung). Without it every rank
    counts every group, and the names agree."""
    if len(ranks) == dist.get_world_size():
        return dist.group.WORLD
    return dist.new_group(ranks)


def auto_layout(world_size: int, model_cfg: ModelConfig, ranks_per_node: int | None = None) -> ParallelConfig:
    """A sensible PP × EP × DP for ``world_size`` ranks and this model.

    Rule (written to scale like V3's 2048 GPUs = PP 16 × DP 128):
      * PP is the largest power of two ≤ sqrt(world) / 2 that divides the world and leaves every
        pipeline stage a decoder layer: 1 up to 15 ranks, 2 for 16–63, 4 for 64–255, ..., 16 for 2048.
        PP > 1 runs DualPipe (PP is even) with 2·PP micro-batches; PP 1 runs without a pipeline.
      * EP is as large as it can be: the largest divisor of DP that also divides n_routed_experts (and,
        when ranks_per_node is given, fits in or fills whole nodes). More EP means fewer experts and less
        optimizer state per rank, and the all-to-all volume per token does not grow with EP.
    E.g. the tiny preset (4 layers, 16 experts): 16 ranks -> PP 2 (DualPipe) × DP 8 with EP 8;
    4 ranks -> PP 1 × DP 4 with EP 4; 6 ranks -> PP 1 × DP 6 with EP 2.
    """
    pp = 1
    while (2 * pp <= math.sqrt(world_size) / 2 and world_size % (2 * pp) == 0
           and 2 * pp <= model_cfg.num_hidden_layers):
        pp *= 2
    dp = world_size // pp
    ep = max(e for e in range(1, dp + 1) if dp % e == 0 and model_cfg.n_routed_experts % e == 0
             and (ranks_per_node is None or e % ranks_per_node == 0 or ranks_per_node % e == 0))
    schedule = "dualpipe" if pp > 1 else "1f1b"
    cfg = ParallelConfig(pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                         pipeline_schedule=schedule, ranks_per_node=ranks_per_node)
    cfg.validate(world_size, model_cfg)
    return cfg
