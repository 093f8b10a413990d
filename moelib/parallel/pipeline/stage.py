"""Pipeline stages: the model cut by layers.

Stage 0 holds the embedding, the last stage the final norm, the head and the MTP modules, which reuse
the embedding. Every stage is the full model's Transformer with the parts it does not own removed, so
parameter names stay global and each tensor is initialised exactly as in the full model (its generator
is keyed by its name), whatever the layout.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from moelib.config import ModelConfig, PrecisionConfig
from moelib.errors import ConfigError
from moelib.model.rope import rope_inv_freq
from moelib.model.transformer import LossOutput, Transformer, build_model, init_weights


@dataclass(frozen=True)
class StageSpec:
    stage_id: int
    num_stages: int
    layer_ids: tuple[int, ...]

    @property
    def is_first(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last(self) -> bool:
        return self.stage_id == self.num_stages - 1


def layer_costs(cfg: ModelConfig, seq_length: int) -> list[float]:
    """Forward FLOPs per token of each decoder layer at ``seq_length`` (ModelConfig.flops_per_token: dense
    and MoE layers differ), the last one also carrying the final norm, the head and every MTP module, which
    run on the last stage; the embedding is a lookup and costs nothing."""
    f = cfg.flops_per_token(seq_length)
    cost = [f["moe" if cfg.is_moe_layer(i) else "dense"] for i in range(cfg.num_hidden_layers)]
    cost[-1] += f["head"] + cfg.num_nextn_predict_layers * f["mtp"]
    return cost


def split_layers(cfg: ModelConfig, num_stages: int, seq_length: int) -> list[StageSpec]:
    """Contiguous runs of decoder layers, at least one per stage, whose costliest stage (``layer_costs`` at
    ``seq_length``) costs the least possible; the trainer and the planner cut the model with this."""
    n = cfg.num_hidden_layers
    if not 1 <= num_stages <= n:
        raise ConfigError(f"ParallelConfig: {num_stages} pipeline stages need at least as many decoder layers; "
                          f"the model has {n}")
    ends = balanced_ends(tuple(layer_costs(cfg, seq_length)), num_stages)
    starts = (0, *ends[:-1])
    return [StageSpec(s, num_stages, tuple(range(a, b))) for s, (a, b) in enumerate(zip(starts, ends))]


@functools.lru_cache(maxsize=256)
def balanced_ends(cost: tuple[float, ...], parts: int) -> tuple[int, ...]:
    """The end index of each of ``parts`` non-empty contiguous runs of ``cost`` such that the largest run sum
    is the least possible; among those splits the most even one (least sum of squared run sums), ties to
    the earliest ends, so every rank computes the same split. Two dynamic programs over prefixes, O(parts n^2)."""
    n = len(cost)
    prefix = list(itertools.accumulate(cost, initial=0.0))
    inf = float("inf")
    # least[j][i]: the least largest run over splits of the first i items into j runs
    least = [[inf] * (n + 1) for _ in range(parts + 1)]
    least[0][0] = 0.0
    for j in range(1, parts + 1):
        for i in range(j, n - (parts - j) + 1):
            least[j][i] = min(max(least[j - 1][a], prefix[i] - prefix[a]) for a in range(j - 1, i))
    bound = least[parts][n] * (1 + 1e-9)  # prefix differences round; a run at the bound must still pass
    squares = [[inf] * (n + 1) for _ in range(parts + 1)]
    squares[0][0] = 0.0
    back = [[0] * (n + 1) for _ in range(parts + 1)]
    for j in range(1, parts + 1):
        for i in range(j, n - (parts - j) + 1):
            for a in range(j - 1, i):
                run = prefix[i] - prefix[a]
                if run <= bound and squares[j - 1][a] + run * run < squares[j][i]:
                    squares[j][i], back[j][i] = squares[j - 1][a] + run * run, a
    ends, i = [], n
    for j in range(parts, 0, -1):
        ends.append(i)
        i = back[j][i]
    return tuple(reversed(ends))


def prune(model: Transformer, spec: StageSpec, keep_embedding: bool = False) -> Transformer:
    """Drop what the stage does not own. ``keep_embedding``: a last stage with MTP and no other copy of the
    embedding on its rank keeps one (its gradient is then summed with the first stage's)."""
    for key in list(model.layers.keys()):
        if int(key) not in spec.layer_ids:
            del model.layers[key]
    if not spec.is_first and not keep_embedding:
        model.embed_tokens = None
    if not spec.is_last:
        model.norm = model.lm_head = None
        model.mtp = nn.ModuleList()
    return model


class PipelineStage(nn.Module):
    """One stage. forward(tokens or hidden, labels) -> hidden, or the LossOutput on the last stage."""

    def __init__(self, model: Transformer, spec: StageSpec, embedding: nn.Embedding | None = None):
        super().__init__()
        self.model, self.spec = model, spec
        # The last stage's MTP reads token embeddings: its own copy, or the one of another stage on the rank.
        self._embedding = [embedding]  # a list, so the shared module is not registered twice

    @property
    def embedding(self) -> nn.Embedding | None:
        return self._embedding[0] if self._embedding[0] is not None else self.model.embed_tokens

    def trunk(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden state after this stage's decoder layers, rope cos, rope sin) for tokens or hidden input."""
        model = self.model
        cos, sin = model.rope(inputs.shape[1], inputs.device)
        h = model.embed(inputs) if self.spec.is_first else inputs
        return model.decoder(h, cos, sin), cos, sin

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None,
                mtp_weight: float = 0.3) -> torch.Tensor | LossOutput:
        model = self.model
        h, cos, sin = self.trunk(inputs)
        if not self.spec.is_last:
            return h
        if labels is None:
            raise ConfigError("PipelineStage: the last stage needs labels")
        return model.head_loss(h, labels, mtp_weight, cos, sin, embedding=self.embedding)


def build_stage(cfg: ModelConfig, precision: PrecisionConfig | str | None, spec: StageSpec, seed: int,
                keep_embedding: bool = False, device: torch.device | str = "cpu") -> Transformer:
    """The pruned model of one stage, materialised and initialised as the full model would be."""
    model = prune(build_model(cfg, precision, device="meta"), spec, keep_embedding)
    model = model.to_empty(device=device)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    for moe in model.moe_layers().values():
        moe.load_counts.zero_()
    init_weights(model, cfg.init_std, seed)
    return model
