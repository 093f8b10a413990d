"""Pipeline stages: the model cut by layers.

Stage 0 holds the embedding, the last stage the final norm, the head and the MTP modules, which reuse
the embedding. Every stage is the full model's Transformer with the parts it does not own removed, so
parameter names stay global and each tensor is initialised exactly as in the full model (its generator
is keyed by its name), whatever the layout.
"""

from __future__ import annotations

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


def split_layers(cfg: ModelConfig, num_stages: int) -> list[StageSpec]:
    """Contiguous runs of decoder layers of about equal cost. The last stage also runs the head and the MTP
    modules (each a decoder block plus a head pass), counted as one layer each plus one for the head."""
    n = cfg.num_hidden_layers
    if not 1 <= num_stages <= n:
        raise ConfigError(f"ParallelConfig: {num_stages} pipeline stages need at least as many decoder layers; "
                          f"the model has {n}")
    cost = [1.0] * n
    cost[-1] += 1.0 + cfg.num_nextn_predict_layers
    total, cum, ends = sum(cost), 0.0, []
    for i, c in enumerate(cost):
        cum += c
        # Close a stage where the cumulative cost passes its share, leaving a layer for each later stage.
        stages_left = num_stages - len(ends) - 1
        if stages_left and (cum >= total * (len(ends) + 1) / num_stages - 0.5 or n - i - 1 == stages_left):
            ends.append(i + 1)
    ends.append(n)
    starts = [0] + ends[:-1]
    return [StageSpec(s, num_stages, tuple(range(a, b))) for s, (a, b) in enumerate(zip(starts, ends))]


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
