"""The end of a step, after the pipeline drains: gradient reduction, the ZeRO-1 parameter all-gather and AdamW.

Bytes are those moelib's collectives move for the parameters a pipeline rank holds (memory.rank_params):
GradSync sums DualPipe's mirror copies (and the last stage's embedding copy) over their two pipeline ranks
and all-reduces fp32 gradients (dense
over DP, routed experts over EDP); ZeroAdamW updates its 1/group shard and all-gathers the fp32 parameters.
A ring all-reduce moves 2(g-1)/g of the bytes per GPU, an all-gather (g-1)/g (a reduce-scatter in place of
the all-reduce would move half the gradient bytes). A group whose ranks fit on one node uses NVLink, any
other the network. AdamW is memory-bound: per owned element it reads the gradient, reads and writes the
fp32 master and both moments; then every Linear weight is cast to the compute dtype (read fp32, write the
copy). Nothing of this overlaps the pipeline here (the step ends when the slowest rank's update does).
"""

from __future__ import annotations

from dataclasses import dataclass

from moelib.config import ModelConfig, ParallelConfig
from moelib.parallel.pipeline.schedule import Schedule
from moelib.plan.hardware import Hardware
from moelib.plan.memory import EMBEDDING, compute_bytes_per_element, rank_params


@dataclass(frozen=True)
class UpdateTime:
    """Seconds of one pipeline rank's step end."""

    gradient_sync: float   # mirror-copy sum and gradient all-reduce
    param_gather: float    # ZeRO-1 all-gather of the updated parameters
    optimizer: float       # AdamW over the owned shard and the compute-weight casts

    @property
    def total(self) -> float:
        return self.gradient_sync + self.param_gather + self.optimizer


def _bandwidth(hw: Hardware, span: int) -> float:
    """Bytes/s per GPU of a group whose members lie within ``span`` consecutive ranks."""
    return 1e9 * (hw.nvlink_gbps if span <= hw.gpus_per_node else hw.network_gbps)


def update_time(cfg: ModelConfig, par: ParallelConfig, world: int, schedule: Schedule, rank: int, seq_length: int,
                hw: Hardware, precision: str = "bf16", moment_bytes: int = 4) -> UpdateTime:
    """The step end of pipeline rank ``rank`` (see the module docstring)."""
    dp = world // par.pp
    edp = dp // par.ep
    copies = [p for chunk in rank_params(cfg, schedule, rank, seq_length) for p in chunk]
    distinct = list({p.name: p for p in copies}.values())
    dense = sum(p.numel for p in distinct if not p.expert)
    expert = sum(p.numel // par.ep for p in distinct if p.expert)
    ring = lambda g: (g - 1) / g  # noqa: E731
    net = _bandwidth(hw, dp)  # DP and EDP groups both lie within the DP consecutive ranks of one pp rank
    if schedule.name == "DualPipe":  # every stage lives on two ranks: their gradients are summed
        mirrored = dense + expert
    else:  # the last stage's copy of the embedding for MTP, where stage 0 is on another rank
        last, first = schedule.route[0][-1][0], schedule.route[0][0][0]
        shared = cfg.num_nextn_predict_layers > 0 and first != last and rank in (first, last)
        mirrored = sum(p.numel for p in distinct if p.owner == EMBEDDING) if shared else 0
    sync = 4 * 2 * ring(2) * mirrored / _bandwidth(hw, world) + 4 * 2 * (ring(dp) * dense + ring(edp) * expert) / net
    gather = 4 * (ring(dp) * dense + ring(edp) * expert) / net
    shard = dense / dp + expert / edp
    linear = sum(p.numel // par.ep if p.expert else p.numel for p in distinct if p.compute == "linear")
    moved = shard * (4 + 8 + 4 * moment_bytes) + linear * (4 + compute_bytes_per_element(precision))
    return UpdateTime(sync, gather, moved / (hw.hbm_tbps * 1e12))
