"""How the world is split over pipeline, data and expert parallelism, and the rules a layout must meet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moelib.config.fields import _from_dict, _positive, _require
from moelib.config.model import ModelConfig

PIPELINE_SCHEDULES = ("1f1b", "dualpipe", "dualpipev")


@dataclass
class ParallelConfig:
    """How the world is split: world = PP × DP, expert parallelism (EP) inside DP, no tensor parallelism.

    Routed experts are sharded over the EP ranks and replicated over DP / EP expert-data-parallel (EDP)
    ranks; everything else is replicated over DP. ``pipeline_schedule``: ``1f1b`` (PP stages), ``dualpipe``
    (PP stages, rank r holds stages r and PP-1-r, so PP must be even) or ``dualpipev`` (2·PP stages, rank r
    holds stages r and 2·PP-1-r). ``num_microbatches`` per DP rank and step; None takes the fewest the
    schedule accepts (1 for 1F1B, 2·PP for DualPipe/DualPipeV). ``ranks_per_node``: how many consecutive
    ranks share a node (None: one node), configurable so node-limited routing can be exercised on one
    machine. ``max_nodes_per_token``: M, the most nodes a token's routed experts may span (None: no limit;
    V3 uses 4). ``moelib.parallel.mesh.auto_layout`` picks these for a world size and model.
    """

    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    pipeline_schedule: str = "1f1b"
    num_microbatches: int | None = None
    ranks_per_node: int | None = None
    max_nodes_per_token: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_model_parallel_size

    @property
    def num_stages(self) -> int:
        """Model chunks the pipeline cuts: DualPipeV folds 2·PP stages onto PP ranks."""
        return 2 * self.pp if self.pipeline_schedule == "dualpipev" else self.pp

    @property
    def microbatches(self) -> int:
        if self.num_microbatches is not None:
            return self.num_microbatches
        return 1 if self.pipeline_schedule == "1f1b" else 2 * self.pp

    def validate(self, world_size: int | None = None, model_cfg: ModelConfig | None = None) -> None:
        """Field rules always; layout rules when the world size (and model) are known. Each broken rule
        raises ConfigError with one sentence naming the field and the rule."""
        c = "ParallelConfig"
        _positive(self, "pipeline_model_parallel_size", "expert_model_parallel_size")
        for name in ("num_microbatches", "ranks_per_node", "max_nodes_per_token"):
            if getattr(self, name) is not None:
                _positive(self, name)
        schedule = self.pipeline_schedule
        _require(schedule in PIPELINE_SCHEDULES, c, "pipeline_schedule",
                 f"must be one of {', '.join(PIPELINE_SCHEDULES)}, got {schedule!r}")
        pp, mb = self.pp, self.microbatches
        _require(schedule != "dualpipe" or pp % 2 == 0, c, "pipeline_model_parallel_size",
                 f"DualPipe needs an even pipeline size (rank r pairs with rank PP-1-r), got {pp}")
        if schedule in ("dualpipe", "dualpipev"):
            _require(mb >= 2 * pp, c, "num_microbatches",
                     f"{schedule} needs at least 2 x pipeline size = {2 * pp} micro-batches, got {mb}")
        _require(schedule != "dualpipe" or mb % 2 == 0, c, "num_microbatches",
                 f"DualPipe needs an even number of micro-batches (half enter from each end), got {mb}")
        if world_size is not None:
            self._validate_world(world_size)
        if model_cfg is not None:
            self._validate_model(model_cfg)

    def _validate_world(self, world: int) -> None:
        c, pp, ep = "ParallelConfig", self.pp, self.ep
        _require(isinstance(world, int) and world > 0, c, "world_size", f"must be a positive integer, got {world!r}")
        _require(world % pp == 0, c, "pipeline_model_parallel_size",
                 f"world size {world} is not divisible by pipeline size {pp}")
        dp = world // pp
        _require(dp % ep == 0, c, "expert_model_parallel_size",
                 f"expert-parallel size {ep} does not divide the data-parallel size {dp} "
                 f"(world {world} / pipeline {pp}); EP groups live inside DP")
        rpn = self.ranks_per_node
        if rpn is not None:
            _require(world % rpn == 0, c, "ranks_per_node", f"{rpn} does not divide the world size {world}")
            # EP ranks are consecutive; an EP group must fill whole nodes or sit inside one.
            _require(ep % rpn == 0 or rpn % ep == 0, c, "ranks_per_node",
                     f"{rpn} ranks per node cut expert-parallel groups of {ep} consecutive ranks unevenly "
                     "(one must divide the other)")

    def _validate_model(self, m: ModelConfig) -> None:
        c, ep = "ParallelConfig", self.ep
        _require(m.n_routed_experts % ep == 0, c, "expert_model_parallel_size",
                 f"expert-parallel size {ep} does not divide n_routed_experts {m.n_routed_experts}")
        stages = self.num_stages
        what = f"{self.pipeline_schedule} cuts the model into {stages} stages"
        _require(stages <= m.num_hidden_layers, c, "pipeline_model_parallel_size",
                 f"{what}, more than num_hidden_layers {m.num_hidden_layers} (each stage needs a decoder layer)")
        if self.max_nodes_per_token is not None and self.ranks_per_node is not None and ep > self.ranks_per_node:
            experts_per_node = m.n_routed_experts // (ep // self.ranks_per_node)
            _require(self.max_nodes_per_token * experts_per_node >= m.num_experts_per_tok, c, "max_nodes_per_token",
                     f"{self.max_nodes_per_token} nodes x {experts_per_node} experts per node cannot hold "
                     f"num_experts_per_tok {m.num_experts_per_tok} experts")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParallelConfig:
        return _from_dict(cls, data)
