"""Gradient reduction after backward, global gradient-norm clipping and the router-bias load sync.

Which ranks hold a parameter:
  * dense parameters (attention, norms, router gate, shared experts, dense FFN, embedding, head) are
    replicated over the DP group;
  * routed-expert parameters (GroupedExperts' stacked ``gate_up_proj`` / ``down_proj``) are sharded
    over the EP group and replicated over the EDP group;
  * a parameter name held by several pipeline ranks is still one parameter: DualPipe keeps stage r on
    ranks r and PP-1-r ("mirror copies"), and a stage builder may put the embedding both with the first
    stage and with MTP. Global names (``layers.5.mlp.gate.weight``) say what is the same parameter, so
    copies are found by name: on one rank (two stage modules holding the same name) and across the
    pipeline (found once, at construction, by exchanging name lists).

Gradient scale (why dense grads are averaged over DP but expert grads summed over EDP and divided by DP):
  Each DP rank r computes L_r, the mean loss over its own tokens (with micro-batches, the mean over its
  micro-batches: each micro-batch loss is scaled by 1/num_microbatches, as the schedules do). The global
  loss is L = (1/DP) · sum_r L_r, the mean over the global batch when every rank has as many tokens.
  * Dense weight θ: rank r's backward gives g_r = dL_r/dθ, so dL/dθ = (1/DP) · sum_r g_r: all-reduce
    (sum) over DP, then divide by DP.
  * Expert weight w held by rank q (and by one rank of every other EP group: its EDP group). Tokens of
    every rank of q's EP group G reach w through the dispatch all-to-all, and each rank's backward sends
    the gradient of its own loss back through the combine all-to-all, so q's backward already yields
    h_G = sum_{r in G} dL_r/dw. Every rank belongs to exactly one EP group, so
        dL/dw = (1/DP) · sum_r dL_r/dw = (1/DP) · sum_{G} h_G,
    the sum over the EDP group (one member per EP group) divided by DP, not by EDP. (Averaging over EDP
    would leave the gradient EP times too large.)
  * Copies across pipeline ranks or on one rank each saw part of the micro-batches: their gradients are
    partial sums of the same derivative, so they are added.

Norm: each distinct parameter is counted once: dense ones on dp_rank 0, expert ones on edp_rank 0, a
name held by several pipeline ranks on the lowest of them, a name held twice on one rank once.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from moelib.model.moe import GroupedExperts, MoE
from moelib.parallel.mesh import Mesh, new_group


class GradSync:
    """Gradient and load-count reduction for the stage modules this rank holds (one module, or two
    for DualPipe/DualPipeV). Building it is collective (every rank, same order)."""

    def __init__(self, mesh: Mesh, modules: nn.Module | Sequence[nn.Module]):
        self.mesh = mesh
        self.modules = [modules] if isinstance(modules, nn.Module) else list(modules)
        # name -> distinct tensors on this rank with that name (more than one: copies in two modules)
        self.params: dict[str, list[nn.Parameter]] = defaultdict(list)
        self.expert_names: set[str] = set()
        self.expert_modules: dict[str, tuple[GroupedExperts, str, str]] = {}  # name -> (module, prefix, attr)
        self.moes: dict[str, list[MoE]] = defaultdict(list)
        for module in self.modules:
            for mod_name, mod in module.named_modules():
                prefix = f"{mod_name}." if mod_name else ""
                for attr, p in mod.named_parameters(recurse=False):
                    if not p.requires_grad:
                        continue
                    _add_distinct(self.params[prefix + attr], p)
                    if _is_expert_module(mod):
                        self.expert_names.add(prefix + attr)
                        self.expert_modules[prefix + attr] = (mod, prefix, attr)
                if isinstance(mod, MoE):
                    _add_distinct(self.moes[mod_name], mod)
        self.names = sorted(self.params)
        self.dense_names = [n for n in self.names if n not in self.expert_names]
        self.expert_param_names = [n for n in self.names if n in self.expert_names]
        self._find_pipeline_copies()

    # -- which names live on several pipeline ranks ---------------------------------------------------

    def _find_pipeline_copies(self) -> None:
        """Exchange name lists once. For each set of pipeline ranks sharing names, create a group per DP
        column (all ranks create all groups in the same order) and remember the shared names."""
        mine = sorted(self.names) + sorted(f"{n}.load_counts" for n in self.moes)
        everyone: list = [None] * self.mesh.world_size
        dist.all_gather_object(everyone, (self.mesh.pp_rank, self.mesh.dp_rank, mine))
        holders: dict[int, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))  # column -> name -> pp
        for pp_rank, dp_rank, names in everyone:
            for n in names:
                holders[dp_rank][n].add(pp_rank)
        # Every DP column should hold the same stages; taking the union keeps the group list (and so the
        # order of new_group calls) identical on every rank even if one does not.
        patterns = sorted({tuple(sorted(h)) for column in holders.values() for h in column.values() if len(h) > 1})
        mine_holders = holders[self.mesh.dp_rank]
        self.min_holder = {n: min(h) for n, h in mine_holders.items()}
        self.shared: list[tuple[dist.ProcessGroup, list[str]]] = []
        for pattern in patterns:
            for dp_rank in range(self.mesh.dp):
                ranks = [self.mesh.global_rank(p, dp_rank) for p in pattern]
                group = new_group(ranks)
                if self.mesh.rank in ranks:
                    names = sorted(n for n in mine if tuple(sorted(mine_holders[n])) == pattern)
                    self.shared.append((group, names))

    # -- gradients -------------------------------------------------------------------------------------

    def grads(self, name: str) -> list[torch.Tensor]:
        return [p.grad for p in self.params[name]]

    def _materialise_grads(self) -> None:
        # A parameter this rank used in no micro-batch still gets a (zero) gradient: its replicas may
        # have one, and every rank must put the same tensors into each collective.
        for name in self.names:
            for p in self.params[name]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    def reduce_gradients(self) -> None:
        """After the last backward of a step: add copies (same rank, then across pipeline ranks), then
        average dense gradients over DP and reduce expert gradients over EDP (sum / DP, see above)."""
        self._materialise_grads()
        for name in self.names:  # copies on this rank: all take the sum
            copies = self.params[name]
            if len(copies) > 1:
                total = sum(p.grad for p in copies)
                for p in copies:
                    p.grad.copy_(total)
        for group, names in self.shared:
            _all_reduce_into([self.grads(n) for n in names if n in self.params], group)
        dp = self.mesh.dp
        _all_reduce_into([self.grads(n) for n in self.dense_names], self.mesh.dp_group, scale=1.0 / dp)
        _all_reduce_into([self.grads(n) for n in self.expert_param_names], self.mesh.edp_group, scale=1.0 / dp)

    def counted_here(self, name: str) -> bool:
        """Whether this rank counts ``name`` in global sums (norms, checkpoints): exactly one rank does."""
        if self.min_holder.get(name, self.mesh.pp_rank) != self.mesh.pp_rank:
            return False
        return self.mesh.edp_rank == 0 if name in self.expert_names else self.mesh.dp_rank == 0

    def grad_norm(self) -> float:
        """Global L2 norm of the (reduced) gradients over every PP/EP/DP rank, each parameter once."""
        device = self.params[self.names[0]][0].device if self.names else torch.device("cpu")
        local = torch.zeros((), dtype=torch.float64, device=device)  # NCCL reduces device tensors only
        for name in self.names:
            if self.counted_here(name) and self.params[name][0].grad is not None:
                local += self.params[name][0].grad.detach().double().pow(2).sum()
        dist.all_reduce(local)
        return math.sqrt(float(local))

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale every gradient by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_
        does; returns the global norm before clipping. max_norm <= 0 or inf: measure only."""
        norm = self.grad_norm()
        coef = max_norm / (norm + 1e-6) if max_norm > 0 else math.inf
        if not coef >= 1.0:  # also when the norm is inf/nan: the gradients then become nan, as with torch
            for name in self.names:
                for p in self.params[name]:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        return norm

    # -- router bias ------------------------------------------------------------------------------------

    def sync_load_counts(self) -> dict[str, torch.Tensor]:
        """[E] token counts per MoE layer summed over the whole global batch: copies on this rank, copies
        on other pipeline ranks, then the DP group (which contains the EP group). ``load_counts`` may be
        [E] (this rank's tokens, local dispatch) or [E_local] (rows this rank's experts computed, as
        expert_parallel.shard_experts leaves it); either way every (token, expert) pair is counted on
        exactly one rank of the DP group, so the sum is the global count. Same result on every rank."""
        totals = {name: sum(_counts_over_all_experts(m) for m in copies) for name, copies in self.moes.items()}
        for group, names in self.shared:
            shared = [n.removesuffix(".load_counts") for n in names if n.endswith(".load_counts")]
            _all_reduce_into([[totals[n]] for n in shared if n in totals], group)
        _all_reduce_into([[totals[n]] for n in sorted(totals)], self.mesh.dp_group)
        return totals

    def update_router_biases(self, speed: float) -> dict[str, torch.Tensor]:
        """Sync the load counts, move every router's bias by the global counts, reset the counts.
        Returns the global counts per MoE layer (for MaxVio)."""
        counts = self.sync_load_counts()
        for name, copies in self.moes.items():
            for moe in copies:
                if speed > 0:
                    moe.gate.update_bias(counts[name], speed)
                moe.load_counts.zero_()
        return counts


def _is_expert_module(module: nn.Module) -> bool:
    # GroupedExperts or a drop-in replacement (an FP8 variant): sharded experts carry an expert_offset.
    return isinstance(module, GroupedExperts) or hasattr(module, "expert_offset")


def _add_distinct(items: list, obj) -> None:
    if not any(o is obj for o in items):
        items.append(obj)


def _all_reduce_into(tensor_lists: Iterable[list[torch.Tensor]], group, scale: float | None = None) -> None:
    """All-reduce (sum) many tensors as one flat buffer; write the result into every copy.
    Each element of ``tensor_lists`` is a list of copies of one tensor (the first is sent)."""
    tensor_lists = [ts for ts in tensor_lists if ts]
    if not tensor_lists:
        return
    flat = torch.cat([ts[0].reshape(-1) for ts in tensor_lists])
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    if scale is not None:
        flat.mul_(scale)
    offset = 0
    for ts in tensor_lists:
        n = ts[0].numel()
        for t in ts:
            t.copy_(flat[offset: offset + n].view_as(t))
        offset += n


def _counts_over_all_experts(moe: MoE) -> torch.Tensor:
    counts = moe.load_counts.detach().float()
    if counts.numel() == moe.num_experts:
        return counts.clone()
    full = counts.new_zeros(moe.num_experts)
    offset = moe.experts.expert_offset
    full[offset: offset + counts.numel()] = counts
    return full
