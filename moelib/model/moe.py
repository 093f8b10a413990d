"""DeepSeekMoE: shared experts plus fine-grained routed experts, no token dropping (REFERENCE §2).

y = x + shared(x) + sum over the top-k routed experts of gate_i(x) · expert_i(x): ``route`` picks the experts
(moelib.model.router), a Dispatcher (moelib.model.dispatch) takes the tokens with their gate values to them and
brings the outputs back (each expert scales its SwiGLU output by the gate value, so the combine is a sum);
``finish`` adds the shared experts, counts the expert load and hooks the sequence-wise balance loss into
backward. Routed experts are stacked ([E, ...]) so one grouped GEMM serves them all; how their
rows are laid out for that GEMM is the precision layer's (moelib.precision.rows).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moelib.config import ModelConfig
from moelib.model.dispatch import LocalDispatcher
from moelib.model.expert_state import PerExpertStateDict
from moelib.model.mlp import MLP
from moelib.model.recompute import SwiGLUCache, recomputing, swiglu_again
from moelib.model.router import Router, sequence_balance_loss
from moelib.precision.backends import Backend
from moelib.precision.linear import compute_dtype
from moelib.precision.rows import PaddedRows, pad_groups, run_in_layout


class GroupedExperts(PerExpertStateDict, nn.Module):
    """E SwiGLU experts. gate_up_proj [E, 2I, H] holds gate rows then up rows; down_proj [E, H, I]."""

    # Set by moelib.train.recompute.apply_recompute: keep only SwiGLU's inputs, recompute its product.
    recompute_swiglu: SwiGLUCache | None = None
    # Where the backend pads rows, every group is padded to the largest when that makes at most this factor
    # of rows (one batched GEMM, see moelib.precision.rows); 1.0 pads each group to its own multiple only.
    equal_groups_up_to: float = 1.25

    def __init__(self, num_experts: int, hidden: int, inter: int, backend: Backend, expert_offset: int = 0):
        super().__init__()
        self.num_experts, self.inter, self.expert_offset = num_experts, inter, expert_offset
        self.backend = backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))

    def forward(self, x: torch.Tensor, counts: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """probs[s] * expert(x[s]) [S, H] for x [S, H] sorted by expert, counts [E] rows per expert, probs [S]
        each row's gate value."""
        if self.backend.expert_row_multiple(x) == 1:
            return self.compute(x, counts, probs)
        return run_in_layout(self.compute, x, self.layout(x, counts), probs)

    def layout(self, x: torch.Tensor, counts: torch.Tensor) -> PaddedRows:
        """Where rows grouped by ``counts`` go for the experts' GEMMs on ``x`` (padded where the backend asks)."""
        multiple = self.backend.expert_row_multiple(x)
        return pad_groups(counts, multiple, self.equal_groups_up_to if multiple > 1 else 1.0)

    def compute(self, x: torch.Tensor, counts: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The experts on rows already in their layout: x [S, H] grouped as ``counts`` [E], padding (if any)
        included, probs [S] (0 in the padding). The gate value scales SwiGLU's output, as fused "SwiGLU with
        probs" kernels do: its gradient then comes from the SwiGLU output backward recomputes anyway, and
        nothing keeps the experts' outputs."""
        gate, up = self.backend.grouped_linear(x, self.gate_up_proj, counts, pow2_input=True).chunk(2, dim=-1)
        hidden, again = swiglu_again(gate, up, self.recompute_swiglu, probs)
        return self.backend.grouped_linear(hidden, self.down_proj, counts, input_again=again)

    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        return {"gate_proj": self.gate_up_proj[e, : self.inter], "up_proj": self.gate_up_proj[e, self.inter:],
                "down_proj": self.down_proj[e]}



def _rows_again(x_again: Callable[[], torch.Tensor] | None, width: int) -> Callable[[], torch.Tensor] | None:
    """x_again's result as [tokens, width] rows."""
    return None if x_again is None else (lambda: x_again().reshape(-1, width))


class AuxLossBackprop(torch.autograd.Function):
    """Adds an auxiliary loss's gradient to the backward pass of an activation it does not change,
    so pipeline stages need not carry aux losses alongside their outputs (as Megatron-Core does)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: Backend):
        super().__init__()
        self.num_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, backend)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size, backend)
                               if cfg.n_shared_experts else None)
        self.dispatcher = LocalDispatcher()
        # Set by the trainer: the factor the main loss is scaled by (1 / micro-batches).
        self.aux_loss_scale = 1.0
        # Expert load of the current global batch, read and reset by the trainer.
        self.register_buffer("load_counts", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.last_aux_loss = torch.zeros(())
        self._aux_sum, self._aux_n = None, 0  # for logging: mean over a step's micro-batches

    def pop_aux_loss(self) -> float:
        """Mean balance loss over the forwards since the last call (0 when there were none)."""
        mean = float(self._aux_sum) / self._aux_n if self._aux_n else 0.0
        self._aux_sum, self._aux_n = None, 0
        return mean

    def forward(self, x: torch.Tensor, x_again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, T, H] normed; ``x_again``: a function recomputing x in backward (the norm's, when it
        recomputes), which the router keeps instead of x."""
        flat, indices, weights, scores = self.route(x, x_again)
        routed_out, counts = self.dispatcher.run(flat, indices, weights, self.experts, self.num_experts)
        return self.finish(flat, routed_out, indices, scores, counts, x.shape, x_again)

    # The pieces of forward, also called one by one by the pipeline's overlapped schedule, which runs
    # the dispatch and combine all-to-alls between them.

    def route(self, x: torch.Tensor, x_again: Callable[[], torch.Tensor] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> (tokens [N, H], expert indices [N, k], gate weights [N, k], scores [N, E]).

        The router sees x as it is (fp32 in V3); the tokens come back in the experts' compute dtype, which
        their GEMMs would cast them to anyway, so the dispatch moves (and sends) half the bytes under bf16.
        """
        flat = x.reshape(-1, x.shape[-1])
        indices, weights, scores = self.gate(flat, _rows_again(x_again, flat.shape[-1]))
        return flat.to(compute_dtype(flat)), indices, weights, scores

    def finish(self, flat: torch.Tensor, routed_out: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor,
               counts: torch.Tensor, shape: torch.Size,
               x_again: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Routed output + shared experts, load statistics and the balance loss's gradient hook; ``x_again``
        as in forward."""
        out = routed_out
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat, _rows_again(x_again, flat.shape[-1]))
        out = out.view(shape)
        if self.training:
            first_run = not recomputing()  # False when backward reruns the layer: count it once
            if first_run:
                self.load_counts += counts.detach().to(self.load_counts.dtype)
            if self.aux_loss_alpha > 0 and torch.is_grad_enabled():
                aux = self.aux_loss_alpha * sequence_balance_loss(scores, indices, shape[0], self.top_k)
                if first_run:
                    self.last_aux_loss = aux.detach()
                    self._aux_n += 1
                    self._aux_sum = aux.detach() if self._aux_sum is None else self._aux_sum + aux.detach()
                out = AuxLossBackprop.apply(out, aux, self.aux_loss_scale)
        return out
