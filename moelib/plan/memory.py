"""Memory per GPU of a training layout: what each pipeline rank holds, row by row.

Weights, gradients and optimizer moments are counted from the real model's parameters (built on the
meta device, so V3's 671B cost nothing), cut into stages by ``split_layers`` and placed on ranks by the
schedule exactly as ParallelTrainer does: routed experts split EP ways, a DualPipe rank holding stages r
and PP-1-r, the last stage keeping its own embedding for MTP when stage 0 lives elsewhere. ZeRO-1
shards each bucket (dense / expert x decay / no decay) as moelib.parallel.zero does: dense over DP,
expert over EDP, rounded up to a whole shard per rank.

Rows (bytes per GPU):
    master_weights   fp32 parameters, every copy on the rank (the optimizer's master copy)
    compute_weights  the per-step cast of every Linear weight (bf16, or FP8 with 128x128 block scales);
                     embedding, router gates and norms are used in fp32, the head and eh_proj in bf16
    gradients        fp32, one per parameter copy
    optimizer        the two AdamW moments of this rank's ZeRO-1 shards
    activations      the most bytes the rank's program holds at once: each forward adds what one
                     micro-batch leaves on that chunk's stage (measured per layer, see activations.py; an
                     MTP block counts as a MoE layer; the head and loss are not counted), each backward
                     frees it
EMA (fp32, one per distinct parameter) lives in host memory and is reported beside the table.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from moelib.config import ModelConfig, ParallelConfig
from moelib.model.transformer import build_model
from moelib.parallel.pipeline.schedule import Schedule
from moelib.parallel.pipeline.simulate import peak_activations
from moelib.parallel.pipeline.stage import StageSpec, split_layers

ROWS = ("master_weights", "compute_weights", "gradients", "optimizer", "activations")
FP8_BLOCK = 128


@dataclass(frozen=True)
class Param:
    name: str
    numel: int           # in the full model (routed experts: all of them)
    expert: bool         # routed experts: split EP ways
    decay: bool          # >= 2-D: AdamW's weight-decay bucket
    compute: str         # the per-step copy: "linear" (compute dtype), "bf16" (head, eh_proj) or "none"
    owner: int           # decoder layer id; EMBEDDING; or LAST (final norm, head, MTP: the last stage's)


EMBEDDING, LAST = -1, -2


@functools.lru_cache(maxsize=8)
def _inventory(cfg_json: str) -> tuple[Param, ...]:
    model = build_model(ModelConfig.from_dict(json.loads(cfg_json)), "bf16", device="meta")
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or name.startswith("embed_tokens") or name.endswith("mlp.gate.weight"):
            compute = "none"
        elif name.startswith("lm_head") or "eh_proj" in name:
            compute = "bf16"
        else:
            compute = "linear"
        expert = ".experts." in name or name.endswith(("experts.gate_up_proj", "experts.down_proj"))
        if name.startswith("layers."):
            owner = int(name.split(".")[1])
        else:
            owner = EMBEDDING if name.startswith("embed_tokens") else LAST
        out.append(Param(name, p.numel(), expert, p.dim() >= 2, compute, owner))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _by_owner(cfg_json: str) -> dict[int, list[Param]]:
    groups: dict[int, list[Param]] = {}
    for p in _inventory(cfg_json):
        groups.setdefault(p.owner, []).append(p)
    return groups


def inventory(cfg: ModelConfig) -> tuple[Param, ...]:
    """Every trainable parameter of the full model (main model and MTP), from a meta-device build."""
    return _inventory(json.dumps(cfg.to_dict(), sort_keys=True))


def rank_params(cfg: ModelConfig, schedule: Schedule, rank: int, seq_length: int) -> list[list[Param]]:
    """Per chunk on pipeline rank ``rank``: the parameters its stage module holds (full-model sizes), by
    moelib.parallel.pipeline.stage.prune's rule: its layers (split_layers at ``seq_length``), the embedding on
    the first stage (and on a last stage with MTP when no stage 0 shares its rank), final norm, head and MTP
    on the last."""
    specs = split_layers(cfg, schedule.num_stages, seq_length)
    stages = [schedule.stage_of(rank, c) for c in range(len(schedule.placement[rank]))]
    has_first = 0 in stages
    groups = _by_owner(json.dumps(cfg.to_dict(), sort_keys=True))
    chunks = []
    for s in stages:
        spec = specs[s]
        keep = spec.is_last and not has_first and cfg.num_nextn_predict_layers > 0
        owners = [*spec.layer_ids, *([EMBEDDING] if spec.is_first or keep else []), *([LAST] if spec.is_last else [])]
        chunks.append([p for owner in owners for p in groups.get(owner, [])])
    return chunks


def compute_bytes_per_element(precision: str) -> float:
    """Bytes per element of a Linear weight's per-step copy: bf16, or E4M3 plus one fp32 scale per block."""
    return 1 + 4 / FP8_BLOCK**2 if precision == "fp8" else 2.0


@dataclass(frozen=True)
class MemoryTable:
    rows: dict[str, float]       # ROWS -> bytes on the GPU
    ema_host_bytes: float
    activation_microbatches: int  # peak in flight on the worst rank
    rank: int                    # the pipeline rank that needs the most

    @property
    def total(self) -> float:
        return sum(self.rows.values())


def state_bytes(cfg: ModelConfig, par: ParallelConfig, world: int, schedule: Schedule, rank: int, seq_length: int,
                precision: str = "bf16", moment_bytes: int = 4) -> dict[str, float]:
    """Weights, gradients, optimizer moments and host EMA of pipeline rank ``rank`` (bytes), exactly what
    ParallelTrainer allocates for them (compute weights: the per-step casts the GPU recipe keeps)."""
    dp = world // par.pp
    edp = dp // par.ep
    chunks = rank_params(cfg, schedule, rank, seq_length)
    local = lambda p: p.numel // par.ep if p.expert else p.numel  # noqa: E731
    copies = [p for chunk in chunks for p in chunk]
    distinct = {p.name: p for p in copies}.values()
    per_compute = {"none": 0.0, "bf16": 2.0, "linear": compute_bytes_per_element(precision)}
    moments = 0
    for expert, group in ((False, dp), (True, edp)):
        for decay in (True, False):
            n = sum(local(p) for p in distinct if p.expert == expert and p.decay == decay)
            moments += 2 * -(-n // group) * moment_bytes if n else 0
    return {
        "master_weights": 4 * sum(local(p) for p in copies),
        "compute_weights": sum(local(p) * per_compute[p.compute] for p in copies),
        "gradients": 4 * sum(local(p) for p in copies),
        "optimizer": moments,
        "ema_host": 4 * sum(local(p) for p in distinct),
    }


def stage_activation_bytes(cfg: ModelConfig, spec: StageSpec, per_token: dict[str, float], tokens: int) -> float:
    """Bytes one micro-batch of ``tokens`` leaves held on stage ``spec`` (per-layer bytes from activations.py)."""
    layers = sum(per_token["moe" if cfg.is_moe_layer(i) else "dense"] for i in spec.layer_ids)
    if spec.is_last:
        layers += cfg.num_nextn_predict_layers * per_token["moe"]
    return tokens * layers


def peak_activation_bytes(schedule: Schedule, rank: int, chunk_bytes: list[float]) -> float:
    """The most activation bytes ``rank`` holds at once, its program walked as ``peak_activations`` does (an
    F&B's forward counted before its backward frees), each forward adding its chunk's bytes."""
    live = peak = 0.0
    for op in schedule.programs[rank]:
        if op.forward is not None:
            live += chunk_bytes[op.forward[1]]
        peak = max(peak, live)
        if op.backward is not None:
            live -= chunk_bytes[op.backward[1]]
    return peak


def memory_table(cfg: ModelConfig, par: ParallelConfig, world: int, schedule: Schedule,
                 per_token: dict[str, float], seq_length: int, micro_batch_size: int = 1, precision: str = "bf16",
                 moment_bytes: int = 4) -> MemoryTable:
    """The memory table of the pipeline rank that needs the most (ranks of one EP group hold the same)."""
    specs = split_layers(cfg, schedule.num_stages, seq_length)
    tokens_per_microbatch = micro_batch_size * seq_length
    peaks = peak_activations(schedule)
    best = None
    for r in range(par.pp):
        rows = state_bytes(cfg, par, world, schedule, r, seq_length, precision, moment_bytes)
        ema = rows.pop("ema_host")
        chunk_bytes = [stage_activation_bytes(cfg, specs[schedule.stage_of(r, c)], per_token, tokens_per_microbatch)
                       for c in range(len(schedule.placement[r]))]
        rows["activations"] = peak_activation_bytes(schedule, r, chunk_bytes)
        table = MemoryTable({k: rows[k] for k in ROWS}, ema, peaks[r], r)
        if best is None or table.total > best.total:
            best = table
    return best
