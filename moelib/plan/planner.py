"""One layout's plan (memory table, step time, throughput, GPU-hours) and the search over layouts."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from moelib.config import ModelConfig, ParallelConfig
from moelib.errors import ConfigError
from moelib.parallel.pipeline.schedule import Schedule, build_schedule
from moelib.parallel.pipeline.simulate import Costs, published_bubble
from moelib.parallel.pipeline.stage import split_layers
from moelib.plan.cache import activation_bytes
from moelib.plan.hardware import Hardware
from moelib.plan.memory import MemoryTable, memory_table
from moelib.plan.timing import ChunkTime, StepTime, all_to_all, stage_flops, step_time
from moelib.plan.update import UpdateTime, update_time
from moelib.train.metrics import model_flops_per_token

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
DEFAULT_EFFICIENCY = 0.3  # achieved fraction of the dense peak of the compute SMs; see tools/plan.py --efficiency


@dataclass(frozen=True)
class PlanInputs:
    model: ModelConfig
    hw: Hardware
    gpus: int
    pp: int
    ep: int
    schedule: str = "dualpipe"
    precision: str = "fp8"           # "bf16" or "fp8": GEMMs, dispatch and weight casts
    seq_length: int = 4096
    global_batch_size: int = 15360   # sequences per step
    micro_batch_size: int = 1
    tokens: float = 1e12             # to train, for GPU-hours
    efficiency: float = DEFAULT_EFFICIENCY
    recompute: str = "selective"
    max_nodes_per_token: int | None = 4
    moment_bytes: int = 2            # AdamW moments: 2 (bf16, V3) or 4
    usable_memory: float = 0.9       # share of HBM a run may fill (the rest: workspace, fragmentation)
    activation_seq: int = 128        # sequence length of the CPU activation measurement

    @property
    def dp(self) -> int:
        return self.gpus // self.pp

    @property
    def microbatches(self) -> int:
        return self.global_batch_size // (self.dp * self.micro_batch_size)


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    memory: MemoryTable
    time: StepTime                   # the pipeline, from the first forward to the last backward
    chunks: tuple[ChunkTime, ...]    # per stage
    network_share: float             # of a MoE layer's all-to-all time, the part on the network
    update: UpdateTime               # after the pipeline: gradient sync, ZeRO all-gather, AdamW

    @property
    def step_time_s(self) -> float:
        return self.time.step_time_s + self.update.total

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.inputs.usable_memory * self.inputs.hw.hbm_bytes

    @property
    def tokens_per_step(self) -> int:
        return self.inputs.global_batch_size * self.inputs.seq_length

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def mfu(self) -> float:
        """Model FLOPs (with MTP) per second over the GPUs' dense bf16 peak."""
        i = self.inputs
        return model_flops_per_token(i.model, i.seq_length) * self.tokens_per_s / (i.gpus * i.hw.peak_flops("bf16"))

    @property
    def gpu_hours(self) -> float:
        return self.inputs.gpus * self.inputs.tokens / self.tokens_per_s / 3600

    @property
    def compute_to_comm(self) -> float | None:
        """V3's ratio: a chunk's forward compute (attention and MLP, on the SMs the all-to-all leaves) over its
        forward dispatch + combine time, the least over the stages (a chunk of MoE layers only, where
        communication weighs most); None without all-to-all."""
        ratios = [c.Fc / c.Cf for c in self.chunks if c.Cf > 0]
        return min(ratios) if ratios else None

    @property
    def one_to_one_efficiency(self) -> float | None:
        """The efficiency at which ``compute_to_comm`` would be 1 (compute time scales as 1 / efficiency)."""
        ratio = self.compute_to_comm
        return None if ratio is None else self.inputs.efficiency * ratio

    @property
    def table2_bubble_s(self) -> float:
        """Table 2's bubble for this schedule (REFERENCE.md section 5) with the costliest stage's chunk times:
        F and B with their all-to-all, W, and F&B overlapped as the simulator plays it."""
        c = max(self.chunks, key=lambda c: c.Fc)
        schedule = _schedule(self.inputs.schedule, self.inputs.pp, self.inputs.microbatches)
        costs = Costs(F=c.Fc + c.Cf, B=c.Bc + c.Cb, W=c.Wc, FB=max(c.Fc + c.Bc, c.Cf + c.Cb))
        return float(published_bubble(schedule, costs))

    @property
    def comm_hidden(self) -> bool:
        """Whether the all-to-all adds under 1 % of the step: hidden under compute."""
        return self.time.exposed_comm_fraction < 0.01

    def to_json(self) -> dict:
        i = self.inputs
        return {
            "model_layout": {"gpus": i.gpus, "pp": i.pp, "ep": i.ep, "dp": i.dp, "schedule": i.schedule,
                             "microbatches": i.microbatches, "precision": i.precision, "gpu": i.hw.name},
            "fits": self.fits,
            "memory_bytes": {**self.memory.rows, "total": self.memory.total},
            "memory_limit_bytes": i.usable_memory * i.hw.hbm_bytes,
            "ema_host_bytes": self.memory.ema_host_bytes,
            "activation_microbatches": self.memory.activation_microbatches,
            "step_time_s": self.step_time_s,
            "pipeline_s": self.time.step_time_s,
            "update_s": {"gradient_sync": self.update.gradient_sync, "param_gather": self.update.param_gather,
                         "optimizer": self.update.optimizer},
            "bubble_fraction": self.time.bubble_fraction,
            "max_rank_idle_s": self.time.step_time_s - min(self.time.busy_s),
            "table2_bubble_s": self.table2_bubble_s,
            "exposed_comm_fraction": self.time.exposed_comm_fraction,
            "comm_hidden": self.comm_hidden,
            "compute_to_comm": self.compute_to_comm,
            "one_to_one_efficiency": self.one_to_one_efficiency,
            "network_share_of_comm": self.network_share,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "efficiency": i.efficiency,
            "gpu_hours": self.gpu_hours,
            "tokens": i.tokens,
        }


def check_inputs(i: PlanInputs) -> ParallelConfig:
    """The layout as a ParallelConfig; ConfigError with one sentence naming the flag otherwise."""
    if i.schedule not in SCHEDULES:
        raise ConfigError(f"--schedule: must be one of {', '.join(SCHEDULES)}, got {i.schedule!r}")
    if i.precision not in ("bf16", "fp8"):
        raise ConfigError(f"--precision: must be bf16 or fp8, got {i.precision!r}")
    if i.gpus <= 0 or i.pp <= 0 or i.ep <= 0:
        raise ConfigError(f"--gpus, --pp and --ep must be positive, got {i.gpus}, {i.pp} and {i.ep}")
    if i.gpus % i.pp:
        raise ConfigError(f"--pp: {i.pp} does not divide --gpus {i.gpus}")
    if i.dp % i.ep:
        raise ConfigError(f"--ep: {i.ep} does not divide the data-parallel size {i.dp} (--gpus {i.gpus} / --pp {i.pp})")
    if i.model.n_routed_experts % i.ep:
        raise ConfigError(f"--ep: {i.ep} does not divide the model's {i.model.n_routed_experts} routed experts")
    if not 0 < i.efficiency <= 1:
        raise ConfigError(f"--efficiency: must lie in (0, 1], got {i.efficiency}")
    per_step = i.dp * i.micro_batch_size
    if i.global_batch_size % per_step:
        raise ConfigError(f"--global-batch-size: {i.global_batch_size} is not a multiple of data-parallel size "
                          f"{i.dp} x --micro-batch-size {i.micro_batch_size}")
    stages = 2 * i.pp if i.schedule == "dualpipev" else i.pp
    if stages > i.model.num_hidden_layers:
        raise ConfigError(f"--pp: {i.schedule} cuts the model into {stages} stages, more than its "
                          f"{i.model.num_hidden_layers} layers")
    m = i.microbatches
    if i.schedule in ("dualpipe", "dualpipev") and (m < 2 * i.pp or (i.schedule == "dualpipe" and m % 2)):
        raise ConfigError(f"--global-batch-size: {i.schedule} needs an even number of at least 2 x --pp = "
                          f"{2 * i.pp} micro-batches per data-parallel rank, got {m}")
    if i.schedule == "dualpipe" and i.pp % 2:
        raise ConfigError(f"--pp: DualPipe needs an even pipeline size, got {i.pp}")
    if i.schedule == "zb1p" and m < i.pp:
        raise ConfigError(f"--global-batch-size: ZB1P needs at least --pp = {i.pp} micro-batches per data-parallel "
                          f"rank, got {m}")
    rpn = i.hw.gpus_per_node
    if (i.ep > rpn and i.ep % rpn) or (i.ep < rpn and rpn % i.ep):
        raise ConfigError(f"--ep: {i.ep} cuts nodes of {rpn} GPUs (--gpus-per-node) unevenly; one must divide "
                          "the other")
    # zb1p is a schedule of the simulator only; the trainer's layout rules are checked with 1f1b in its place
    par = ParallelConfig(pipeline_model_parallel_size=i.pp, expert_model_parallel_size=i.ep,
                         pipeline_schedule="1f1b" if i.schedule == "zb1p" else i.schedule, num_microbatches=m)
    par.validate(i.gpus, i.model)
    return par


def chunk_times(i: PlanInputs, specs) -> tuple[list[ChunkTime], float]:
    """Per stage, seconds for one micro-batch; and the network's share of the all-to-all time. With expert
    parallelism the compute runs on the SMs the all-to-all leaves (V3: 112 of 132)."""
    tokens = i.micro_batch_size * i.seq_length
    share = i.hw.compute_share if i.ep > 1 else 1.0
    gemm_peak = i.efficiency * share * i.hw.peak_flops(i.precision)
    core_peak = i.efficiency * share * i.hw.peak_flops("bf16")
    a2a = all_to_all(i.model, i.hw, i.ep, tokens, i.precision == "fp8", i.max_nodes_per_token)
    chunks = []
    for spec in specs:
        gemm, core = stage_flops(i.model, spec, i.seq_length)
        fc = tokens * (gemm / gemm_peak + core / core_peak)
        n_moe = sum(i.model.is_moe_layer(layer) for layer in spec.layer_ids)
        if spec.is_last:
            n_moe += i.model.num_nextn_predict_layers
        chunks.append(ChunkTime(fc, 2 * fc, fc, n_moe * a2a.forward, n_moe * a2a.backward))
    return chunks, a2a.network_share


def _per_token(i: PlanInputs) -> dict[str, float]:
    backend = "fp8-emulated" if i.precision == "fp8" else "bf16"
    return activation_bytes(i.model, backend, i.recompute, i.activation_seq)


def plan_memory(i: PlanInputs, per_token: dict[str, float] | None = None, schedule: Schedule | None = None
                ) -> MemoryTable:
    """The memory table of one layout (checked first). ``per_token``: activation bytes per token per layer
    kind (measured if None)."""
    check_inputs(i)
    schedule = schedule or _schedule(i.schedule, i.pp, i.microbatches)
    return memory_table(i.model, _parallel(i), i.gpus, schedule, per_token or _per_token(i), i.seq_length,
                        i.micro_batch_size, i.precision, i.moment_bytes)


def make_plan(i: PlanInputs, per_token: dict[str, float] | None = None) -> Plan:
    """The plan of one layout: memory table and step time."""
    check_inputs(i)
    schedule = _schedule(i.schedule, i.pp, i.microbatches)
    table = plan_memory(i, per_token, schedule)
    chunks, network_share, pipeline = _pipeline(i, schedule)
    return Plan(i, table, pipeline, tuple(chunks), network_share, _update(i, schedule))


_schedule = functools.lru_cache(maxsize=64)(build_schedule)


def _pipeline(i: PlanInputs, schedule: Schedule) -> tuple[list[ChunkTime], float, StepTime]:
    chunks, network_share = chunk_times(i, split_layers(i.model, schedule.num_stages, i.seq_length))
    return chunks, network_share, step_time(schedule, chunks)


def _update(i: PlanInputs, schedule: Schedule) -> UpdateTime:
    """The slowest pipeline rank's step end (gradient sync, ZeRO all-gather, AdamW)."""
    return max((update_time(i.model, _parallel(i), i.gpus, schedule, r, i.seq_length, i.hw, i.precision,
                            i.moment_bytes) for r in range(i.pp)), key=lambda u: u.total)


def _parallel(i: PlanInputs) -> ParallelConfig:
    return ParallelConfig(pipeline_model_parallel_size=i.pp, expert_model_parallel_size=i.ep)


def efficiency_for_gpu_hours(i: PlanInputs, gpu_hours: float) -> float:
    """The efficiency at which the plan takes ``gpu_hours`` for ``i.tokens`` (bisection; step time falls as
    efficiency rises). ConfigError if even efficiency 1 is slower."""
    check_inputs(i)
    schedule = _schedule(i.schedule, i.pp, i.microbatches)
    tail = _update(i, schedule).total  # does not depend on the efficiency

    def hours(efficiency: float) -> float:
        step = _pipeline(dataclasses.replace(i, efficiency=efficiency), schedule)[2].step_time_s + tail
        return i.gpus * i.tokens * step / (i.global_batch_size * i.seq_length) / 3600

    lo, hi = 1e-4, 1.0
    if hours(hi) > gpu_hours:
        raise ConfigError(f"--target-gpu-hours: {gpu_hours:.4g} GPU-hours is out of reach even at efficiency 1")
    for _ in range(20):  # geometric halving: hi / lo ends at 1e4 ** 2**-20, within 1e-5
        mid = math.sqrt(lo * hi)
        if hours(mid) > gpu_hours:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class Candidate:
    inputs: PlanInputs
    plan: Plan | None
    reason: str | None               # why it does not fit or is not allowed


def search(i: PlanInputs, per_token: dict[str, float] | None = None) -> list[Candidate]:
    """Every layout the layout rules allow for ``i.gpus``: PP a power of two (DualPipe when even, and 1F1B),
    EP any size that divides DP and the experts. Fitting plans first, fastest first; then the others with
    the reason (a broken rule, or the memory that overflows; those are not timed)."""
    per_token = per_token or _per_token(i)
    limit = i.usable_memory * i.hw.hbm_bytes
    out = []
    pp = 1
    while pp <= min(i.gpus, i.model.num_hidden_layers):
        dp = i.gpus // pp
        eps = [e for e in range(1, dp + 1) if i.gpus % pp == 0 and dp % e == 0 and i.model.n_routed_experts % e == 0]
        for ep in eps:
            for schedule in ("dualpipe", "1f1b") if pp > 1 else ("1f1b",):
                cand = dataclasses.replace(i, pp=pp, ep=ep, schedule=schedule)
                try:
                    table = plan_memory(cand, per_token)
                except ConfigError as e:
                    out.append(Candidate(cand, None, str(e)))
                    continue
                if table.total > limit:
                    out.append(Candidate(cand, None, overflow(table, limit)))
                else:
                    out.append(Candidate(cand, make_plan(cand, per_token), None))
        pp *= 2
    fitting = sorted((c for c in out if c.reason is None), key=lambda c: c.plan.step_time_s)
    return fitting + [c for c in out if c.reason is not None]


def overflow(table: MemoryTable, limit: float) -> str:
    """Why ``table`` does not fit: the total, the limit and the largest row."""
    biggest = max(table.rows, key=table.rows.get)
    return (f"needs {table.total / 2**30:.1f} GiB per GPU, over the {limit / 2**30:.1f} GiB usable "
            f"(largest row: {biggest} {table.rows[biggest] / 2**30:.1f} GiB)")
