"""mpirun worker: every valid PP × EP layout of this world builds groups with exactly the right members.

    mesh_groups.py [PP:EP,...]    default: every (PP, EP) with PP | world and EP | DP, plus auto_layout

For each layout every group kind is checked twice: its member list against the layout formula, and by a
real collective (an all-reduce of one-hot rank vectors over the group must mark exactly those members).
Between layouts, a group only the first and last rank join (as grad_sync makes for a weight both pipeline
ends hold), so the next layout's groups are created after groups some ranks joined and others did not.
Rank 0 prints one RESULT line per layout.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from _sync_common import main, result

from moelib.config import ModelConfig, ParallelConfig
from moelib.parallel.mesh import GROUP_KINDS, Mesh, auto_layout, coords_of, new_group


def all_layouts(world: int) -> list[tuple[int, int]]:
    return [(pp, ep) for pp in range(1, world + 1) if world % pp == 0
            for ep in range(1, world // pp + 1) if (world // pp) % ep == 0]


def check(mesh: Mesh) -> list[str]:
    bad, world, rank = [], mesh.world_size, mesh.rank
    me = coords_of(rank, world, mesh.pp, mesh.ep)
    same = {"pp": lambda c: c.dp == me.dp, "dp": lambda c: c.pp == me.pp,
            "ep": lambda c: (c.pp, c.edp) == (me.pp, me.edp), "edp": lambda c: (c.pp, c.ep) == (me.pp, me.ep)}
    for kind in GROUP_KINDS:
        expected = [r for r in range(world) if same[kind](coords_of(r, world, mesh.pp, mesh.ep))]
        if mesh.ranks[kind] != expected:
            bad.append(f"rank {rank} {kind} ranks {mesh.ranks[kind]} != {expected}")
        onehot = torch.zeros(world)
        onehot[rank] = 1
        dist.all_reduce(onehot, group=mesh.groups[kind])
        members = onehot.nonzero().squeeze(1).tolist()
        if members != expected or dist.get_rank(mesh.groups[kind]) != expected.index(rank):
            bad.append(f"rank {rank} {kind} group reaches {members}, expected {expected}")
    if mesh.ranks["ep"] != list(range(mesh.ranks["ep"][0], mesh.ranks["ep"][0] + mesh.ep)):
        bad.append(f"rank {rank}: EP group {mesh.ranks['ep']} is not consecutive ranks")
    if (mesh.pp_next is not None and coords_of(mesh.pp_next, world, mesh.pp, mesh.ep).pp != mesh.pp_rank + 1) or \
            coords_of(mesh.pp_mirror, world, mesh.pp, mesh.ep).pp != mesh.pp - 1 - mesh.pp_rank:
        bad.append(f"rank {rank}: pipeline neighbours wrong")
    return bad


def run(env) -> None:
    world = env.world_size
    layouts = [tuple(map(int, s.split(":"))) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 \
        else all_layouts(world)
    tiny = ModelConfig.from_preset("tiny")
    configs = [ParallelConfig(pp, ep) for pp, ep in layouts] + [auto_layout(world, tiny)]
    for cfg in configs:
        mesh = Mesh(cfg)
        bad = check(mesh)
        everyone = [None] * world
        dist.all_gather_object(everyone, bad)
        result(world=world, pp=cfg.pp, ep=cfg.ep, schedule=cfg.pipeline_schedule,
               errors=[e for part in everyone for e in part])
        ends = new_group([0, world - 1])
        if dist.get_rank() in (0, world - 1):
            dist.all_reduce(torch.ones(1), group=ends)


if __name__ == "__main__":
    main(run)
