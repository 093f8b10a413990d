"""DeepSeekMoE: shared experts plus fine-grained routed experts, no token dropping.

Routed experts are stored stacked ([E, ...]) so one grouped GEMM serves them all; their state dict
entries are still one per expert under global ids (``experts.17.up_proj.weight``), so checkpoints do
not depend on how experts are sharded. The layer reaches its experts through a Dispatcher: the local
one here, or an all-to-all one swapped in by the parallel layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moelib.config import ModelConfig
from moelib.model.mlp import MLP
from moelib.model.recompute import SwiGLUCache, recomputing, swiglu
from moelib.model.router import Router, sequence_balance_loss
from moelib.precision.backends import Backend
from moelib.precision.linear import compute_dtype

_EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


class GroupedExperts(nn.Module):
    """E SwiGLU experts. gate_up_proj [E, 2I, H] holds gate rows then up rows; down_proj [E, H, I]."""

    # Set by moelib.train.recompute.apply_recompute: keep only SwiGLU's inputs, recompute its product.
    recompute_swiglu: SwiGLUCache | None = None
    # Where rows are padded (bf16 on CPU), every group is padded to the largest when that makes at most this
    # factor of rows: one batched GEMM (grouped.equal_group_size), ~1.6x the rate of a GEMM per expert on
    # CPU. 1.0 pads each group to its own multiple only.
    equal_groups_up_to: float = 1.25

    def __init__(self, num_experts: int, hidden: int, inter: int, backend: Backend, expert_offset: int = 0):
        super().__init__()
        self.num_experts, self.inter, self.expert_offset = num_experts, inter, expert_offset
        self.backend = backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [S, H] sorted by expert, counts [E] rows per expert."""
        if self.backend.expert_row_multiple(x) == 1:
            return self.compute(x, counts)
        # Zero rows in, their outputs dropped: the result and every gradient are as unpadded.
        layout = self.layout(x, counts)
        y = self.compute(_PadRows.apply(x, layout), layout.counts)
        return _TakeRows.apply(y, layout.rows, layout.source, layout.padding)

    def layout(self, x: torch.Tensor, counts: torch.Tensor) -> PaddedRows:
        """Where rows grouped by ``counts`` go for the experts' GEMMs on ``x`` (padded where the backend asks)."""
        multiple = self.backend.expert_row_multiple(x)
        return pad_groups(counts, multiple, self.equal_groups_up_to if multiple > 1 else 1.0)

    def compute(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts on rows already in their layout: x [S, H] grouped as ``counts`` [E], padding (if any)
        included."""
        gate, up = self.backend.grouped_linear(x, self.gate_up_proj, counts, pow2_input=True).chunk(2, dim=-1)
        return self.backend.grouped_linear(swiglu(gate, up, self.recompute_swiglu), self.down_proj, counts)

    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        return {"gate_proj": self.gate_up_proj[e, : self.inter], "up_proj": self.gate_up_proj[e, self.inter:],
                "down_proj": self.down_proj[e]}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for e in range(self.num_experts):
            for name, tensor in self.expert_weights(e).items():
                key = f"{prefix}{self.expert_offset + e}.{name}.weight"
                destination[key] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        with torch.no_grad():
            for e in range(self.num_experts):
                for name, target in self.expert_weights(e).items():
                    key = f"{prefix}{self.expert_offset + e}.{name}.weight"
                    if key not in state_dict:
                        missing_keys.append(key)
                    elif state_dict[key].shape != target.shape:
                        error_msgs.append(f"{key}: shape {tuple(state_dict[key].shape)} in the checkpoint, "
                                          f"{tuple(target.shape)} in the model")
                    else:
                        target.copy_(state_dict[key])
        if strict:
            mine = {f"{prefix}{self.expert_offset + e}.{n}.weight" for e in range(self.num_experts)
                    for n in _EXPERT_WEIGHTS}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in mine
                                   and k[len(prefix):].split(".")[0].isdigit())


@dataclass
class PaddedRows:
    """Where rows grouped by expert go in a padded layout (``pad_groups``)."""
    rows: torch.Tensor     # [S]: each row's index in the padded layout
    counts: torch.Tensor   # [E]: padded rows per group
    source: torch.Tensor   # [P]: the row each padded row copies (0 for padding)
    padding: torch.Tensor  # the padding rows' indices



def pad_groups(counts: torch.Tensor, multiple: int, equal_up_to: float = 1.0) -> PaddedRows:
    """The layout of rows grouped by ``counts`` once each group is padded to a multiple of ``multiple``, or
    every group to the largest one's padded size when that makes at most ``equal_up_to`` times the rows."""
    padded = (counts + multiple - 1) // multiple * multiple
    if len(counts) > 1 and equal_up_to > 1:
        largest = padded.max()
        if int(largest) * len(counts) <= equal_up_to * int(padded.sum()):
            padded = largest.expand_as(padded).clone()
    shift = (torch.cumsum(padded, 0) - padded) - (torch.cumsum(counts, 0) - counts)
    n, total = int(counts.sum()), int(padded.sum())
    rows = torch.arange(n, device=counts.device) + shift.repeat_interleave(counts)
    source = torch.zeros(total, dtype=torch.long, device=counts.device).index_copy_(
        0, rows, torch.arange(n, device=counts.device))
    is_pad = torch.ones(total, dtype=torch.bool, device=counts.device).index_fill_(0, rows, False)
    return PaddedRows(rows, padded, source, is_pad.nonzero().squeeze(1))


def _place(x: torch.Tensor, source: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """x's rows in a padded layout (PaddedRows.source / .padding), zeros in the padding: a gather (a
    scatter into zeros with index_copy took ~3x as long on CPU)."""
    return x.index_select(0, source).index_fill_(0, padding, 0)


class _PadRows(torch.autograd.Function):
    """x's rows placed in a padded layout. Keeps only the layout for backward (index_select would keep x
    as well: one more copy of the routed tokens per MoE layer)."""

    @staticmethod
    def forward(ctx, x, layout):
        ctx.save_for_backward(layout.rows)
        return _place(x, layout.source, layout.padding)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return grad.index_select(0, rows), None


class _GatherTokens(torch.autograd.Function):
    """x[token_of_row]: each token copied once per chosen expert, to its rows of the experts' layout (zeros in
    the padding rows, if any). ``pos`` [N*k] is each (token, slot) pair's row. The backward is the combine
    with unit weights, a fixed-order sum over the k copies, so gradients are deterministic (an index
    backward accumulates the copies in a thread-dependent order)."""

    @staticmethod
    def forward(ctx, x, token_of_row, padding, pos, top_k):
        ctx.save_for_backward(pos)
        ctx.top_k = top_k
        return _place(x, token_of_row, padding)

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        return sum_slots(grad.index_select(0, pos).view(-1, ctx.top_k, grad.shape[-1])), None, None, None, None


class _TakeRows(torch.autograd.Function):
    """y[rows] for distinct rows: expert rows out of their (padded) layout, or back out of expert order.
    ``source`` / ``padding`` are the inverse (PaddedRows'): the backward gathers the gradient rows back
    with ``source`` and zeros the ``padding`` rows no output took. index_select's own backward adds them
    into zeros with index_add, 5x slower on CPU."""

    @staticmethod
    def forward(ctx, y, rows, source, padding):
        ctx.save_for_backward(source, padding)
        return y.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        return _place(grad, *ctx.saved_tensors), None, None, None


@dataclass
class DispatchState:
    order: torch.Tensor    # [N*k]: the (token, slot) pairs in expert order
    inverse: torch.Tensor  # [N*k]: where each (token, slot) pair sits in expert order
    weights: torch.Tensor  # [N, k]: gate values, applied when combining
    num_tokens: int
    top_k: int


def sum_slots(v: torch.Tensor) -> torch.Tensor:
    """v [N, k, H] -> sum over k in fp32, rounded once to v's dtype: what ``v.sum(1)`` computes, with one
    pass per slot (the strided reduction over k ran 1.4x slower on CPU)."""
    acc = v[:, 0].to(torch.float32, copy=True)
    for j in range(1, v.shape[1]):
        acc.add_(v[:, j])
    return acc.to(v.dtype)


class _WeightedSum(torch.autograd.Function):
    """sum_k w[:, k] * y[:, k] for y [N, k, H] and w [N, k] of y's dtype, accumulated in fp32 and rounded
    once, as the batched GEMM w[:, None] @ y computes it; thousands of [1, k] @ [k, H] GEMMs ran ~25 %
    slower forward and ~60 % slower backward than one pass per slot on CPU."""

    @staticmethod
    def forward(ctx, y, w):
        ctx.save_for_backward(y, w)
        acc = y[:, 0].to(torch.float32, copy=True).mul_(w[:, :1])
        for j in range(1, y.shape[1]):
            acc.addcmul_(y[:, j], w[:, j:j + 1])
        return acc.to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        y, w = ctx.saved_tensors
        grad_y = grad.unsqueeze(1) * w.unsqueeze(-1) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(y, grad.unsqueeze(-1)).squeeze(-1) if ctx.needs_input_grad[1] else None
        return grad_y, grad_w


def weighted_sum(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y [N, k, H], weights [N, k] -> sum_k weights_k * y_k, [N, H] in y's dtype (weights rounded to it)."""
    return _WeightedSum.apply(y, weights.to(y.dtype))


def _by_expert(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs of ``indices`` [N, k] in expert order (stable: token order within an expert),
    and each expert's count."""
    flat = indices.reshape(-1)
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=num_experts)


class LocalDispatcher:
    """All experts on this process: sort (token, slot) pairs by expert, gather, and undo it.

    The Dispatcher protocol the MoE layer talks to: ``dispatch(x, indices, weights, num_experts)`` returns
    the rows this process's experts must compute (sorted by local expert), the row count of each local
    expert and a state; ``combine(y, state)`` returns sum_k weight_k * expert_k(x) per token.
    """

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, num_experts: int):
        order, counts = _by_expert(indices, num_experts)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        top_k = indices.shape[1]
        state = DispatchState(order, inverse, weights, x.shape[0], top_k)
        no_padding = order[:0]
        return _GatherTokens.apply(x, order // top_k, no_padding, inverse, top_k), counts, state

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """y [N*k, H] in expert order -> sum_k weight_k * y_k per token, [N, H]."""
        unsorted = _TakeRows.apply(y, state.inverse, state.order, state.order[:0])
        unsorted = unsorted.view(state.num_tokens, state.top_k, y.shape[-1])
        return weighted_sum(unsorted, state.weights)

    def run(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
            experts: GroupedExperts) -> tuple[torch.Tensor, torch.Tensor]:
        """combine(experts(*dispatch(...))) with the same bits, returning (out [N, H], counts [E]): tokens are
        gathered straight into the experts' padded layout and their outputs straight back per (token, slot),
        two passes over the routed rows fewer each way than dispatching, padding, unpadding and combining."""
        order, counts = _by_expert(indices, experts.num_experts)
        layout = experts.layout(x, counts)
        top_k = indices.shape[1]
        pos = torch.empty_like(order).index_copy_(0, order, layout.rows)  # each pair's row in the layout
        pair = order.index_select(0, layout.source)  # the pair each row holds (any, for padding)
        rows = _GatherTokens.apply(x, pair // top_k, layout.padding, pos, top_k)
        # Back per (token, slot): the layout read in token order.
        out = _TakeRows.apply(experts.compute(rows, layout.counts), pos, pair, layout.padding)
        return weighted_sum(out.view(x.shape[0], top_k, out.shape[-1]), weights), counts


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat, indices, weights, scores = self.route(x)
        if isinstance(self.dispatcher, LocalDispatcher):
            routed_out, counts = self.dispatcher.run(flat, indices, weights, self.experts)
        else:
            routed_in, counts, state = self.dispatcher.dispatch(flat, indices, weights, self.num_experts)
            routed_out = self.dispatcher.combine(self.experts(routed_in, counts), state)
        return self.finish(flat, routed_out, indices, scores, counts, x.shape)

    # The pieces of forward, also called one by one by the pipeline's overlapped schedule, which runs
    # the dispatch and combine all-to-alls between them.

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> (tokens [N, H], expert indices [N, k], gate weights [N, k], scores [N, E]).

        The router sees x as it is (fp32 in V3); the tokens come back in the experts' compute dtype, which
        their GEMMs would cast them to anyway, so the dispatch moves (and sends) half the bytes under bf16.
        """
        flat = x.reshape(-1, x.shape[-1])
        indices, weights, scores = self.gate(flat)
        return flat.to(compute_dtype(flat)), indices, weights, scores

    def finish(self, flat: torch.Tensor, routed_out: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor,
               counts: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Routed output + shared experts, load statistics and the balance loss's gradient hook."""
        out = routed_out
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
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
