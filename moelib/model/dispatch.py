"""Token movement between a MoE layer and its routed experts: the Dispatcher protocol and its one-process
implementation.

A dispatcher takes each token, with its gate values, to the experts it was routed to and brings their
outputs back: each expert scales its output row by the row's gate value (GroupedExperts), so the combine is a
plain sum. ``LocalDispatcher`` (all experts on this process) is the model's default, so a model runs in one
process without the parallel layer; moelib.parallel.expert_parallel.AllToAllDispatcher implements the same
protocol over all-to-alls when experts are sharded. The row mechanics both use are in moelib.precision.rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from moelib.precision.rows import gather_tokens, sum_slots, take_rows


class Dispatcher(ABC):
    """``dispatch(x, indices, weights, num_experts)`` returns the rows this process's experts must compute
    (sorted by local expert), the row count of each local expert and a state whose ``row_weights`` [S] are
    the rows' gate values; ``combine(y, state)`` returns each token's sum of its rows of y, the experts'
    outputs already scaled by ``row_weights``. ``run`` is both around the experts."""

    @abstractmethod
    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, num_experts: int):
        ...

    @abstractmethod
    def combine(self, y: torch.Tensor, state) -> torch.Tensor:
        ...

    def run(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts,
            num_experts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_k weight_k * expert_k(x) [N, H], rows per local expert [E_local]); ``num_experts`` is the
        layer's (all ranks'), by default the experts'."""
        rows, counts, state = self.dispatch(x, indices, weights, num_experts or experts.num_experts)
        return self.combine(experts(rows, counts, state.row_weights), state), counts


@dataclass
class DispatchState:
    order: torch.Tensor        # [N*k]: the (token, slot) pairs in expert order
    inverse: torch.Tensor      # [N*k]: where each (token, slot) pair sits in expert order
    row_weights: torch.Tensor  # [N*k]: the gate value of each row (pair in expert order)
    num_tokens: int
    top_k: int


def by_expert(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs of ``indices`` [N, k] in expert order (stable: token order within an expert),
    and each expert's count."""
    flat = indices.reshape(-1)
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=num_experts)


class LocalDispatcher(Dispatcher):
    """All experts on this process: sort (token, slot) pairs by expert, gather, and undo it."""

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, num_experts: int):
        order, counts = by_expert(indices, num_experts)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        top_k = indices.shape[1]
        state = DispatchState(order, inverse, weights.reshape(-1).index_select(0, order), x.shape[0], top_k)
        no_padding = order[:0]
        return gather_tokens(x, order // top_k, no_padding, inverse, top_k), counts, state

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """y [N*k, H] in expert order -> sum_k y_k per token, [N, H]."""
        unsorted = take_rows(y, state.inverse, state.order, state.order[:0])
        return sum_slots(unsorted.view(state.num_tokens, state.top_k, y.shape[-1]))

    def run(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts,
            num_experts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """combine(experts(*dispatch(...))) with the same bits, returning (out [N, H], counts [E]): tokens are
        gathered straight into the experts' padded layout and their outputs straight back per (token, slot),
        two passes over the routed rows fewer each way than dispatching, padding, unpadding and combining."""
        if few_rows(indices, experts.num_experts):
            return run_chosen(x, indices, weights, experts)
        order, counts = by_expert(indices, experts.num_experts)
        layout = experts.layout(x, counts)
        top_k = indices.shape[1]
        pos = torch.empty_like(order).index_copy_(0, order, layout.rows)  # each pair's row in the layout
        pair = order.index_select(0, layout.source)  # the pair each row holds (any, for padding)
        rows = gather_tokens(x, pair // top_k, layout.padding, pos, top_k)
        probs = weights.reshape(-1).index_select(0, pair).index_fill(0, layout.padding, 0)
        # Back per (token, slot): the layout read in token order.
        out = take_rows(experts.compute(rows, layout.counts, probs), pos, pair, layout.padding)
        return sum_slots(out.view(x.shape[0], top_k, out.shape[-1])), counts


def few_rows(indices: torch.Tensor, num_experts: int) -> bool:
    """Inference on at most one (token, slot) pair per expert on average (decode, draft verification): most
    experts get no rows, and padding each chosen one's rows to the backend's multiple would mostly compute
    zeros."""
    return not torch.is_grad_enabled() and indices.numel() <= num_experts


def run_chosen(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
               experts) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_k weight_k * expert_k(x) [N, H], counts [E]) with only the chosen experts computed, on unpadded
    rows (the backend's grouped GEMM skips experts without rows); no autograd."""
    top_k = indices.shape[1]
    order, counts = by_expert(indices, experts.num_experts)
    y = experts.compute(x.index_select(0, order // top_k), counts, weights.reshape(-1).index_select(0, order))
    pairs = torch.empty_like(y).index_copy_(0, order, y)  # back in (token, slot) order
    return sum_slots(pairs.view(x.shape[0], top_k, y.shape[-1])), counts
