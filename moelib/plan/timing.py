"""Time per step: each chunk's compute and all-to-all time, played through the schedule simulator.

Compute. A stage's forward FLOPs per token are ModelConfig.flops_per_token's for its blocks (the ones
moelib.train.metrics.model_flops_per_token adds up: 2 x activated matmul parameters, plus the causal
attention core); they run at ``efficiency`` of the dense peak (GEMMs at the precision's peak, the attention
core at bf16's, as V3 keeps it in bf16), of the SMs the all-to-all leaves when there is one (planner).
The backward is twice the forward: B = 2F, of which the weight-grad W = F, so I = B - W = F.

Communication, per MoE layer and micro-batch of T tokens on a GPU, as DeepEP moves them (REFERENCE.md
section 6): the EP group spans N nodes of g GPUs; node-limited routing sends a token to at most M nodes,
taken as M of the N uniformly, so it crosses the network to M(N-1)/N other nodes, once per node, then
fans out over NVLink to the GPUs holding its experts (of its top-k experts spread over the M·g GPUs
of the chosen nodes, the expected number of distinct GPUs, less its own). Dispatch sends E4M3 with one
fp32 scale per 128 values under FP8, else bf16; combine and both backward all-to-alls send bf16.
Network and NVLink run at once: a transfer takes the longer of the two.

Ops for the simulator (per stage; Fc, Bc, Wc compute, Cf and Cb the chunk's forward and backward
all-to-all time): F = Fc + Cf, B = Bc + Cb, I = Bc - Wc + Cb, W = Wc (nothing to send), and DualPipe's
F&B of a forward chunk f and a backward chunk b = max(Fc_f + Bc_b, Cf_f + Cb_b): each half's all-to-all
runs while the other half computes, so only communication beyond the partner's compute is exposed.
Anything above the compute of an op is exposed communication; the rest of the pipeline's time is bubble.
What follows the pipeline (gradient sync, ZeRO all-gather, AdamW) is moelib.plan.update's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from moelib.config import ModelConfig
from moelib.parallel.pipeline.schedule import Op, Schedule
from moelib.parallel.pipeline.simulate import Costs, simulate
from moelib.parallel.pipeline.stage import StageSpec
from moelib.plan.hardware import Hardware

FP8_TILE = 128


def stage_flops(cfg: ModelConfig, spec: StageSpec, seq: int) -> tuple[float, float]:
    """(GEMM, attention-core) forward FLOPs per token of stage ``spec``."""
    f = cfg.flops_per_token(seq)
    total = sum(f["moe" if cfg.is_moe_layer(i) else "dense"] for i in spec.layer_ids)
    cores = len(spec.layer_ids)
    if spec.is_last:
        total += f["head"] + cfg.num_nextn_predict_layers * f["mtp"]
        cores += cfg.num_nextn_predict_layers
    return total - cores * f["attention"], cores * f["attention"]


@dataclass(frozen=True)
class AllToAll:
    """Seconds of one MoE layer's all-to-alls for one micro-batch on one GPU."""

    dispatch: float
    combine: float
    network_share: float  # of dispatch + combine, the part the network alone would take

    @property
    def forward(self) -> float:
        return self.dispatch + self.combine

    @property
    def backward(self) -> float:
        return 2 * self.combine  # dispatch's backward is a combine and vice versa, both in bf16


def all_to_all(cfg: ModelConfig, hw: Hardware, ep: int, tokens: int, fp8_dispatch: bool,
               max_nodes: int | None) -> AllToAll:
    """Dispatch and combine time of one MoE layer for ``tokens`` tokens on a GPU (see the module docstring)."""
    if ep == 1:
        return AllToAll(0.0, 0.0, 0.0)
    g = min(ep, hw.gpus_per_node)
    n = max(1, ep // hw.gpus_per_node)
    m = n if max_nodes is None else min(max_nodes, n)
    remote_nodes = m * (n - 1) / n
    gpus = m * g  # the GPUs a token's experts can sit on
    k = cfg.num_experts_per_tok
    fanout = gpus * (1 - (1 - 1 / gpus) ** k) * (gpus - 1) / gpus  # distinct GPUs but its own
    h = cfg.hidden_size
    dispatch_width = h * (1 + 4 / FP8_TILE) if fp8_dispatch else 2 * h
    seconds = []
    for width in (dispatch_width, 2 * h):
        network = tokens * remote_nodes * width / (hw.network_gbps * 1e9)
        nvlink = tokens * fanout * width / (hw.nvlink_gbps * 1e9)
        seconds.append((max(network, nvlink), network))
    (d, dn), (c, cn) = seconds
    return AllToAll(d, c, (dn + cn) / (d + c))


@dataclass(frozen=True)
class ChunkTime:
    """Seconds of one stage for one micro-batch: compute of F, B, W and the all-to-all of F and B."""

    Fc: float
    Bc: float
    Wc: float
    Cf: float
    Cb: float


@dataclass(frozen=True)
class StageCosts(Costs):
    """Per-stage op durations for ``simulate`` (``Costs``' F, B, W are the slowest stage's compute)."""

    schedule: Schedule | None = None
    chunks: tuple[ChunkTime, ...] = ()

    def _chunk(self, rank: int, chunk: int) -> ChunkTime:
        return self.chunks[self.schedule.stage_of(rank, chunk)]

    def compute(self, op: Op, rank: int) -> float:
        """The compute part of ``op``'s duration."""
        if op.kind == "FB":
            f, b = self._chunk(rank, op.chunk), self._chunk(rank, op.b_chunk)
            return f.Fc + b.Bc - (b.Wc if op.defer_w else 0.0)
        c = self._chunk(rank, op.chunk)
        return {"F": c.Fc, "B": c.Bc, "I": c.Bc - c.Wc, "W": c.Wc}[op.kind]

    def of(self, op: Op, rank: int = 0) -> float:
        if op.kind == "FB":
            f, b = self._chunk(rank, op.chunk), self._chunk(rank, op.b_chunk)
            return max(self.compute(op, rank), f.Cf + b.Cb)
        c = self._chunk(rank, op.chunk)
        return self.compute(op, rank) + {"F": c.Cf, "B": c.Cb, "I": c.Cb, "W": 0.0}[op.kind]


def stage_costs(schedule: Schedule, chunks: list[ChunkTime]) -> StageCosts:
    slow = max(chunks, key=lambda c: c.Fc)
    return StageCosts(F=slow.Fc, B=slow.Bc, W=slow.Wc, schedule=schedule, chunks=tuple(chunks))


@dataclass(frozen=True)
class Replay:
    """A schedule's ops in an order the simulator could run them (each after its rank's previous op and
    after the ops whose messages it consumes), found once: replaying it with other durations gives
    ``simulate``'s times without matching messages again (the planner times one schedule many times)."""

    ops: tuple[tuple[int, Op], ...]   # (rank, op)
    waits: tuple[tuple[int, ...], ...]  # per op: indices into ops of its rank's previous op and its producers


@functools.lru_cache(maxsize=32)
def replay_of(schedule: Schedule) -> Replay:
    """The replay order of ``schedule``: the order ``simulate`` ran its ops in."""
    events = simulate(schedule, Costs(F=1, B=2, W=1)).events
    index: dict[tuple[int, int], int] = {}  # (rank, position in its program) -> index in the order
    done = [0] * schedule.pp
    for i, e in enumerate(events):
        index[e.rank, done[e.rank]] = i
        done[e.rank] += 1
    producer = {m: index[r, k] for r, prog in enumerate(schedule.programs) for k, op in enumerate(prog)
                for m in schedule.produces(r, op)}
    ops, waits = [None] * len(events), [()] * len(events)
    for (r, k), i in index.items():
        op = schedule.programs[r][k]
        ops[i] = (r, op)
        waits[i] = (*([index[r, k - 1]] if k else []), *(producer[m] for m in schedule.consumes(r, op)))
    return Replay(tuple(ops), tuple(waits))


@dataclass(frozen=True)
class StepTime:
    step_time_s: float
    bubble_fraction: float        # idle share of all pipeline ranks' time
    exposed_comm_fraction: float  # all-to-all time not hidden under compute, share of all ranks' time
    compute_s: float              # per rank, mean
    busy_s: tuple[float, ...] = ()     # per rank: compute and exposed all-to-all
    compute_per_rank_s: tuple[float, ...] = ()


def step_time(schedule: Schedule, chunks: list[ChunkTime]) -> StepTime:
    """Play ``schedule`` with these chunk times (messages take no time, as in ``simulate`` with comm 0):
    makespan, bubble and exposed communication."""
    costs = stage_costs(schedule, chunks)
    replay = replay_of(schedule)
    durations: dict[tuple, tuple[float, float]] = {}  # by what an op's duration depends on
    end = [0.0] * len(replay.ops)
    busy, compute = [0.0] * schedule.pp, [0.0] * schedule.pp
    for i, ((r, op), waits) in enumerate(zip(replay.ops, replay.waits)):
        key = (r, op.kind, op.chunk, op.b_chunk, op.defer_w)
        if key not in durations:
            durations[key] = (costs.of(op, r), costs.compute(op, r))
        took, work = durations[key]
        end[i] = max((end[j] for j in waits), default=0.0) + took
        busy[r] += took
        compute[r] += work
    makespan = max(end)
    total = makespan * schedule.pp
    return StepTime(makespan, 1 - sum(busy) / total, (sum(busy) - sum(compute)) / total, sum(compute) / schedule.pp,
                    tuple(busy), tuple(compute))
