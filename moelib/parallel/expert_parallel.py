"""Expert parallelism: routed experts sharded over an EP group, tokens moved by all-to-all (DeepEP semantics).

Dispatch sends each token ONCE per destination rank, with the local expert ids it picked there and their
gate values; the receiver expands (token, local expert) pairs and sorts them by expert for the grouped
GEMM (the experts scale their outputs by the gate values). Combine sums the outputs of the receiver's experts
per received token, sends one vector
per (token, rank) back, and the source sums over ranks. No token is dropped.

Backward of dispatch is a combine and vice versa. Every reduction (a token's copies over ranks, a row's
pairs over experts) is a gather into a fixed [rows, slots] table followed by a sum over slots, never an
index-accumulate, so gradients are bit-for-bit deterministic (as moelib.model.dispatch's local dispatcher).

Each all-to-all carries one byte buffer per row (payload, then gate values and expert ids), so one
collective moves everything and ``bytes_sent`` counts exactly what goes on the wire. With ``fp8=True``
dispatch sends E4M3 tokens with one power-of-two fp32 scale per 1×128 tile; combine and both backward
all-to-alls send bf16 (gate values and their gradients stay fp32).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moelib.errors import ConfigError
from moelib.model.dispatch import Dispatcher
from moelib.model.moe import MoE
from moelib.precision.fp8 import TILE, dequantize, quantize
from moelib.precision.rows import sum_slots

_WIRE_BF16 = torch.bfloat16


# ---------------------------------------------------------------------------------------------------
# Deterministic gather / reduce through slot tables
# ---------------------------------------------------------------------------------------------------


def _table_rows(y: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[M, J, C]: y[table[m, j]], zeros where the table holds the pad index len(y)."""
    return torch.cat([y, y.new_zeros(1, y.shape[1])])[table]


class _Expand(torch.autograd.Function):
    """x[index]: row m of x is copied to the output rows listed in table[m]. Backward sums the copies in
    slot order."""

    @staticmethod
    def forward(ctx, x, index, table):
        ctx.save_for_backward(table)
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        (table,) = ctx.saved_tensors
        return _table_rows(grad, table).sum(1), None, None


class _Collect(torch.autograd.Function):
    """[M, J, C] slots filled from y by table (each row of y lands in exactly one slot, at flat position
    flat[i]). Backward gathers each row's gradient from its slot."""

    @staticmethod
    def forward(ctx, y, table, flat):
        ctx.save_for_backward(flat)
        return _table_rows(y, table)

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        return grad.flatten(0, 1)[flat], None, None


# ---------------------------------------------------------------------------------------------------
# Byte-buffer rows and the all-to-all itself
# ---------------------------------------------------------------------------------------------------


def _pack(parts: list[torch.Tensor]) -> torch.Tensor:
    """[S, bytes] uint8: each row's parts side by side."""
    return torch.cat([p.contiguous().view(torch.uint8) for p in parts], dim=1)


def _unpack(buf: torch.Tensor, layout: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    out, col = [], 0
    for dtype, width in layout:
        nbytes = width * dtype.itemsize
        out.append(buf[:, col: col + nbytes].contiguous().view(dtype))
        col += nbytes
    return out


class _InFlight:
    """A posted all-to-all: ``wait()`` completes it and returns the received buffer."""

    def __init__(self, recv: torch.Tensor, work):
        self.recv, self.work = recv, work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.recv

    def is_completed(self) -> bool:
        return self.work is None or self.work.is_completed()


@dataclass
class _Route:
    """Where this rank's tokens go: send rows are (token, destination rank) pairs in rank-major order."""

    group: dist.ProcessGroup | None
    size: int
    src_token: torch.Tensor   # [S]: the token of each send row
    table: torch.Tensor       # [N, J]: a token's send rows, one slot per destination rank it picked (pad = S)
    send_splits: list[int]    # rows to each rank (dispatch direction)
    recv_splits: list[int]    # rows from each rank

    def exchange(self, buf: torch.Tensor, forward: bool, async_op: bool, stats: Counter, kind: str,
                 group: dist.ProcessGroup | None = None) -> _InFlight:
        """Send rows of buf along the route (forward: source -> experts) or back along it. ``group``: the
        group to send on (backward passes use the dispatcher's grad_group), default the route's."""
        send, recv = (self.send_splits, self.recv_splits) if forward else (self.recv_splits, self.send_splits)
        stats[kind] += buf.numel() * buf.element_size()
        if self.size == 1:
            return _InFlight(buf, None)
        out = buf.new_empty(sum(recv), buf.shape[1])
        group = self.group if group is None else group
        work = dist.all_to_all_single(out, buf.contiguous(), recv, send, group=group, async_op=async_op)
        return _InFlight(out, work if async_op else None)


# ---------------------------------------------------------------------------------------------------
# The two all-to-all autograd functions: each one's backward is the other's forward
# ---------------------------------------------------------------------------------------------------


class _DispatchExchange(torch.autograd.Function):
    """(x [N, H], weights [N, k]) -> rows received (x rows, gate values per slot). The all-to-all was
    posted by dispatch_start; forward waits for it. Backward sends row and gate-value gradients back
    (bf16 rows when the dispatcher uses FP8; gate values fp32) and sums each token's over ranks."""

    @staticmethod
    def forward(ctx, x, weights, payload, dispatcher, route, on_rank):
        recv_x, recv_w, recv_ids = payload.unpack()
        ctx.route, ctx.dispatcher, ctx.x_dtype, ctx.w_dtype = route, dispatcher, x.dtype, weights.dtype
        ctx.save_for_backward(on_rank)
        ctx.mark_non_differentiable(recv_ids)
        return recv_x, recv_w, recv_ids

    @staticmethod
    def backward(ctx, grad_x, grad_w, _):
        (on_rank,) = ctx.saved_tensors
        route, d = ctx.route, ctx.dispatcher
        wire = d.grad_wire_dtype(ctx.x_dtype)
        layout = [(wire, grad_x.shape[1]), (torch.float32, grad_w.shape[1])]
        buf = _pack([grad_x.to(wire), grad_w.float()])
        inflight = route.exchange(buf, False, False, d.bytes_sent, "dispatch_grad", d.grad_group)
        back_x, back_w = _unpack(inflight.wait(), layout)
        gx = _table_rows(back_x.to(ctx.x_dtype), route.table).sum(1)
        gw = _table_rows(torch.where(on_rank, back_w, 0.0), route.table).sum(1)
        return gx, gw.to(ctx.w_dtype), None, None, None, None


class _CombineExchange(torch.autograd.Function):
    """Reduced rows on the expert side [R, H] -> out [N, H] at the source, summed over ranks. The all-to-all
    was posted by combine_start; forward waits. Backward sends each token's gradient to its ranks."""

    @staticmethod
    def forward(ctx, rows, pending, dispatcher, route):
        back = pending.wait()
        ctx.route, ctx.dispatcher, ctx.dtype = route, dispatcher, rows.dtype
        return _table_rows(back.to(rows.dtype), route.table).sum(1)

    @staticmethod
    def backward(ctx, grad):
        route, d = ctx.route, ctx.dispatcher
        wire = d.grad_wire_dtype(ctx.dtype)
        buf = _pack([grad[route.src_token].to(wire)])
        inflight = route.exchange(buf, True, False, d.bytes_sent, "combine_grad", d.grad_group)
        (g,) = _unpack(inflight.wait(), [(wire, grad.shape[1])])
        return g.to(ctx.dtype), None, None, None


# ---------------------------------------------------------------------------------------------------
# The dispatcher
# ---------------------------------------------------------------------------------------------------


@dataclass
class EpDispatchState:
    route: _Route
    row_weights: torch.Tensor   # [pairs]: gate value of each pair in expert order (the experts' rows)
    table: torch.Tensor         # [R, k]: each (row, slot)'s position in expert order (pad = pairs)
    pair_flat: torch.Tensor     # [pairs]: row*k + slot of each pair in expert order


class _Payload:
    """Received dispatch buffer with its layout, decoded once on the expert side."""

    def __init__(self, inflight: _InFlight, layout, fp8: bool, x_dtype: torch.dtype):
        self.inflight, self.layout, self.fp8, self.x_dtype = inflight, layout, fp8, x_dtype

    def unpack(self):
        parts = _unpack(self.inflight.wait(), self.layout)
        if self.fp8:
            data, scale, w, ids = parts
            x = dequantize(data.view(torch.float8_e4m3fn), scale, (1, TILE), self.x_dtype)
        else:
            x, w, ids = parts
        return x, w, ids.long()


class _Received:
    """Combine's received buffer decoded back to its wire dtype."""

    def __init__(self, inflight: _InFlight, dtype: torch.dtype, width: int):
        self.inflight, self.dtype, self.width = inflight, dtype, width

    def wait(self) -> torch.Tensor:
        return _unpack(self.inflight.wait(), [(self.dtype, self.width)])[0]


class DispatchHandle:
    """An in-flight dispatch; ``wait()`` returns (rows sorted by local expert, counts per local expert, state)."""

    def __init__(self, dispatcher, x, weights, payload, route, on_rank):
        self._args = (x, weights, payload, route, on_rank)
        self._d = dispatcher
        self._inflight = payload.inflight
        self._result = None

    def is_completed(self) -> bool:
        """Whether the all-to-all has finished (wait() may still be needed to decode it)."""
        return self._inflight.is_completed()

    def wait(self):
        if self._result is None:
            x, weights, payload, route, on_rank = self._args
            recv_x, recv_w, ids = _DispatchExchange.apply(x, weights, payload, self._d, route, on_rank)
            self._result = self._d._expand(recv_x, recv_w, ids, route)
            self._args = None
        return self._result


class CombineHandle:
    """An in-flight combine; ``wait()`` returns [N, H] = sum_k weight_k * expert_k(x) per token."""

    def __init__(self, rows, pending, dispatcher, route):
        self._args = (rows, pending, dispatcher, route)
        self._inflight = pending.inflight
        self._result = None

    def is_completed(self) -> bool:
        return self._inflight.is_completed()

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._result = _CombineExchange.apply(*self._args)
            self._args = None
        return self._result


class AllToAllDispatcher(Dispatcher):
    """The MoE Dispatcher (moelib.model.dispatch) over ``all_to_all_single`` in ``ep_group``.

    ``dispatch``/``combine`` are synchronous; ``dispatch_start``/``combine_start`` post the payload
    all-to-all (``async_op=True``) and return a handle whose ``wait()`` finishes it, so compute can run
    in between. The row counts are exchanged synchronously inside dispatch_start (a [ep_size] int64
    all-to-all; the receiver must know them to size its buffer). Backward all-to-alls are synchronous.
    ``bytes_sent`` counts the send-buffer bytes of every all-to-all by kind: "layout", "dispatch",
    "combine", "dispatch_grad", "combine_grad".
    """

    def __init__(self, ep_group: dist.ProcessGroup | None, num_experts: int, fp8: bool = False,
                 grad_group: dist.ProcessGroup | None = None):
        self.group = ep_group
        # Backward all-to-alls go over grad_group (same ranks): the pipeline's overlapped schedule issues
        # them from another thread, and each group's collectives must come in the same order on all ranks.
        self.grad_group = ep_group if grad_group is None else grad_group
        self.size, self.rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
        check_ep_size(num_experts, self.size)
        self.num_experts, self.num_local = num_experts, num_experts // self.size
        self.fp8 = fp8
        self.ids_dtype = torch.int16 if self.num_local < 2**15 else torch.int32
        self.bytes_sent: Counter = Counter()

    def grad_wire_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """What activation gradients travel as: bf16 when dispatching in FP8, else their own dtype."""
        return _WIRE_BF16 if self.fp8 else dtype

    # -- dispatch ------------------------------------------------------------------------------------

    def _route(self, indices: torch.Tensor) -> tuple[_Route, torch.Tensor]:
        """Send rows (token, rank) for every rank a token picked an expert on, and the counts exchange."""
        n, k = indices.shape
        dest = indices // self.num_local
        sent = torch.zeros(n, self.size, dtype=torch.bool, device=indices.device).scatter_(1, dest, True)
        rank_of_row, src_token = sent.t().nonzero(as_tuple=True)  # rank-major, then token order
        slots = min(self.size, k)
        slot = (sent.long().cumsum(1) - 1)[src_token, rank_of_row]
        num_rows = src_token.numel()
        table = torch.full((n * slots,), num_rows, dtype=torch.long, device=indices.device)
        table[src_token * slots + slot] = torch.arange(num_rows, device=indices.device)
        send_counts = sent.sum(0)
        recv_counts = torch.empty_like(send_counts)
        if self.size == 1:
            recv_counts.copy_(send_counts)
        else:
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        self.bytes_sent["layout"] += send_counts.numel() * send_counts.element_size()
        route = _Route(self.group, self.size, src_token, table.view(n, slots), send_counts.tolist(),
                       recv_counts.tolist())
        return route, dest[src_token] == rank_of_row.unsqueeze(1)

    def dispatch_start(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                       num_experts: int) -> DispatchHandle:
        if num_experts != self.num_experts:
            raise ConfigError(f"the MoE routes over {num_experts} experts but its dispatcher was built for "
                              f"{self.num_experts}")
        route, on_rank = self._route(indices)
        with torch.no_grad():
            src = route.src_token
            local_ids = torch.where(on_rank, indices[src] % self.num_local, -1).to(self.ids_dtype)
            w = torch.where(on_rank, weights[src].float(), 0.0)
            if self.fp8:
                # Quantise each token once, then copy its bytes to every rank it goes to.
                data, scale = quantize(x.detach(), (1, TILE), pow2_scale=True, name="dispatched tokens")
                parts = [data.view(torch.uint8)[src], scale[src], w, local_ids]
            else:
                parts = [x.detach()[src], w, local_ids]
            layout = [(p.dtype, p.shape[1]) for p in parts]
            inflight = route.exchange(_pack(parts), True, True, self.bytes_sent, "dispatch")
        payload = _Payload(inflight, layout, self.fp8, x.dtype)
        return DispatchHandle(self, x, weights, payload, route, on_rank)

    def _expand(self, recv_x, recv_w, ids, route):
        """Received rows -> one row per (row, local expert) pair, in local expert order."""
        rows, k = ids.shape
        key = torch.where(ids >= 0, ids, self.num_local).reshape(-1)
        counts = torch.bincount(key, minlength=self.num_local + 1)[: self.num_local]
        pairs = int(counts.sum())
        pair_flat = torch.argsort(key, stable=True)[:pairs]
        table = torch.full((rows * k,), pairs, dtype=torch.long, device=ids.device)
        table[pair_flat] = torch.arange(pairs, device=ids.device)
        table = table.view(rows, k)
        expanded = _Expand.apply(recv_x, pair_flat // k, table)
        row_weights = recv_w.reshape(-1).index_select(0, pair_flat)
        return expanded, counts, EpDispatchState(route, row_weights, table, pair_flat)

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, num_experts: int):
        return self.dispatch_start(x, indices, weights, num_experts).wait()

    # -- combine -------------------------------------------------------------------------------------

    def combine_start(self, y: torch.Tensor, state: EpDispatchState) -> CombineHandle:
        """Sum this rank's (already weighted) expert outputs per received row, and post the send back."""
        slots = _Collect.apply(y, state.table, state.pair_flat)  # [R, k, H], zeros in unused slots
        rows = sum_slots(slots)
        wire = _WIRE_BF16 if self.fp8 else rows.dtype
        with torch.no_grad():
            inflight = state.route.exchange(_pack([rows.detach().to(wire)]), False, True, self.bytes_sent, "combine")
        return CombineHandle(rows, _Received(inflight, wire, rows.shape[1]), self, state.route)

    def combine(self, y: torch.Tensor, state: EpDispatchState) -> torch.Tensor:
        return self.combine_start(y, state).wait()


# ---------------------------------------------------------------------------------------------------
# Sharding a model
# ---------------------------------------------------------------------------------------------------


def check_ep_size(num_experts: int, ep_size: int) -> None:
    if num_experts % ep_size:
        raise ConfigError(f"expert-parallel size {ep_size} must divide n_routed_experts ({num_experts}).")


def check_node_limit(moe: MoE, ep_size: int, ranks_per_node: int, max_nodes: int) -> tuple[int, int]:
    """(experts_per_node, max_nodes) for Router.node_limit, or a ConfigError naming the broken rule."""
    if ranks_per_node < 1 or ep_size % ranks_per_node:
        raise ConfigError(f"ranks_per_node ({ranks_per_node}) must be a positive divisor of the "
                          f"expert-parallel size ({ep_size}).")
    if max_nodes < 1:
        raise ConfigError(f"max_nodes must be at least 1, got {max_nodes}.")
    per_node = ranks_per_node * moe.num_experts // ep_size
    if max_nodes * per_node < moe.top_k:
        raise ConfigError(f"max_nodes x experts per node ({max_nodes} x {per_node}) must be at least "
                          f"num_experts_per_tok ({moe.top_k}).")
    gate = moe.gate
    group_size = moe.num_experts // gate.n_group
    if gate.topk_group < gate.n_group and per_node % group_size:
        # Otherwise a node and a group limit could leave fewer than top_k experts to choose from.
        raise ConfigError(f"with group-limited routing, expert groups ({group_size} experts) must nest in "
                          f"nodes ({per_node} experts) to limit nodes.")
    return per_node, max_nodes


def _moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def shard_experts(model: nn.Module, ep_group: dist.ProcessGroup | None = None, *, fp8: bool = False,
                  ranks_per_node: int | None = None, max_nodes: int | None = None,
                  grad_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Turn every MoE layer of a full model into its EP-local form, in place; returns the model.

    This rank keeps experts [ep_rank*E_local, (ep_rank+1)*E_local) (state-dict keys stay global through
    ``expert_offset``) and reaches the others through an AllToAllDispatcher. ``load_counts`` restarts as the
    [E_local] count of rows this rank's experts computed (the MoE layer adds the dispatcher's per-local-
    expert counts to it); ``global_load_counts`` sums it into the [E] counts the bias update needs.
    With ``ranks_per_node`` and ``max_nodes`` each token reaches at most max_nodes nodes of
    ranks_per_node consecutive EP ranks. Build optimizers after sharding (the expert Parameters change).
    """
    size, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    layers = _moe_layers(model)
    limits = []
    for moe in layers:  # validate everything before changing anything
        check_ep_size(moe.num_experts, size)
        if moe.experts.num_experts != moe.num_experts:
            raise ConfigError("shard_experts: the model's experts are already sharded.")
        if (ranks_per_node is None) != (max_nodes is None):
            raise ConfigError("node-limited routing needs both ranks_per_node and max_nodes.")
        limits.append(None if max_nodes is None else check_node_limit(moe, size, ranks_per_node, max_nodes))
    for moe, limit in zip(layers, limits):
        experts, local = moe.experts, moe.num_experts // size
        lo = rank * local
        for name in ("gate_up_proj", "down_proj"):
            old = getattr(experts, name)
            setattr(experts, name, nn.Parameter(old.detach()[lo: lo + local].clone(), old.requires_grad))
        experts.num_experts, experts.expert_offset = local, lo
        moe.dispatcher = AllToAllDispatcher(ep_group, moe.num_experts, fp8, grad_group)
        moe.load_counts = moe.load_counts.new_zeros(local)
        moe.gate.node_limit = limit
    return model


def global_load_counts(moe: MoE, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[E] token counts per expert summed over ``group`` (which must contain the EP group, e.g. the data-
    parallel group of this pipeline stage): each rank contributes its experts' slice."""
    experts = moe.experts
    full = moe.load_counts.new_zeros(moe.num_experts)
    full[experts.expert_offset: experts.expert_offset + experts.num_experts] = moe.load_counts
    if dist.get_world_size(group) > 1:
        dist.all_reduce(full, group=group)
    return full
