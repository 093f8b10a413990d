"""ZeRO-1 AdamW: optimizer states sharded over the ranks that hold the same parameters.

Dense parameters are replicated over the DP group, so their AdamW moments are split DP ways; routed
experts are replicated over the EDP group, so theirs are split EDP ways (and each rank holds only 1/EP of
the experts to begin with): every rank keeps about 1/DP of the model's optimizer state.

Per bucket (dense / expert × with / without weight decay, params in global-name order so every replica
agrees on the layout) the parameters are viewed as one flat fp32 vector, padded to a multiple of the
group size; rank i of the group owns the contiguous slice [i·S, (i+1)·S) and that slice's exp_avg and
exp_avg_sq. A step reads the owned slice of the (already reduced, see GradSync) gradients and of the
parameters, applies torch.optim.AdamW's update (decoupled weight decay; no decay for 1-D parameters, as
moelib.train.optimizer.param_groups), and all-gathers the updated slices so every replica holds the same
parameters. No flat copy of the whole gradient is made; the all-gather needs one flat buffer per bucket
for a moment. The fp32 master weights are the model's own (fp32) parameters.

The moments are stored in ``moment_dtype`` (fp32, or bf16 as in V3); the arithmetic is
moelib.precision.adamw.adamw_update_, the single-process optimizer's, so bf16 moments round identically
whatever the layout (see that module for when the rounding happens and why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moelib.errors import CheckpointError
from moelib.model.moe import GroupedExperts
from moelib.parallel.grad_sync import GradSync
from moelib.precision.adamw import adamw_scratch, adamw_update_, moment_dtype_of

# torch 2.13 renamed all_gather_into_tensor (and deprecated the old name); moelib supports torch >= 2.6.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class _Bucket:
    names: list[str]
    copies: list[list[torch.nn.Parameter]]  # per name, every tensor on this rank with that name
    group: dist.ProcessGroup
    hyper: dict                             # the param_groups entry (lr, betas, eps, weight_decay)
    offsets: list[int] = field(default_factory=list)
    numel: int = 0
    shard: int = 0                          # S: elements per rank
    lo: int = 0                             # this rank's slice [lo, lo + S)
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    moment_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        sizes = [c[0].numel() for c in self.copies]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.numel = sum(sizes)
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.shard = -(-self.numel // size)
        self.lo = rank * self.shard
        device = self.copies[0][0].device
        self.exp_avg = torch.zeros(self.shard, device=device, dtype=self.moment_dtype)
        self.exp_avg_sq = torch.zeros(self.shard, device=device, dtype=self.moment_dtype)

    def read_slice(self, tensors: list[torch.Tensor], lo: int, length: int) -> torch.Tensor:
        """[lo, lo + length) of the flat concatenation of ``tensors`` (zeros past the end)."""
        out = torch.zeros(length, device=self.exp_avg.device, dtype=torch.float32)
        for t, off in zip(tensors, self.offsets):
            a, b = max(lo, off), min(lo + length, off + t.numel())
            if a < b:
                out[a - lo: b - lo] = t.detach().reshape(-1)[a - off: b - off]
        return out

    def write_full(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for copies, off in zip(self.copies, self.offsets):
                for p in copies:
                    p.copy_(flat[off: off + p.numel()].view_as(p))

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        full = torch.empty(self.shard * dist.get_world_size(self.group), device=shard.device, dtype=shard.dtype)
        _all_gather(full, shard.contiguous(), group=self.group)
        return full


class ZeroAdamW:
    """AdamW with states sharded ZeRO-1 style over the parameters of a GradSync (which knows which
    parameters are dense or expert and which are copies of one another).

    Usage per step: backward; ``sync.reduce_gradients()``; ``sync.clip_grad_norm_(clip)``; ``opt.step()``;
    ``opt.zero_grad()``. ``param_groups`` has a decay and a no-decay entry whose "lr" a scheduler may set,
    as with torch.optim. Unlike torch, a parameter without a gradient is stepped with a zero gradient
    (GradSync gives every parameter one, so replicas never diverge).
    """

    def __init__(self, sync: GradSync, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, moment_dtype: str | torch.dtype = torch.float32):
        self.sync = sync
        self.moment_dtype = moment_dtype_of(moment_dtype)
        hyper = dict(lr=lr, betas=tuple(betas), eps=eps)
        self.param_groups = [dict(hyper, weight_decay=weight_decay, params=[]),
                             dict(hyper, weight_decay=0.0, params=[])]
        self.step_count = 0
        self.buckets: list[_Bucket] = []
        mesh = sync.mesh
        for names, group in ((sync.dense_names, mesh.dp_group), (sync.expert_param_names, mesh.edp_group)):
            for decay, hyper_group in ((True, self.param_groups[0]), (False, self.param_groups[1])):
                chosen = [n for n in names if (sync.params[n][0].dim() >= 2) == decay
                          and sync.params[n][0].requires_grad]
                if not chosen:
                    continue
                for n in chosen:
                    if sync.params[n][0].dtype != torch.float32:
                        raise TypeError(f"ZeroAdamW keeps fp32 master weights in the parameters; {n} is "
                                        f"{sync.params[n][0].dtype}")
                hyper_group["params"].extend(sync.params[n][0] for n in chosen)
                self.buckets.append(_Bucket(chosen, [sync.params[n] for n in chosen], group, hyper_group,
                                            moment_dtype=self.moment_dtype))

    # -- the update -------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        t = self.step_count
        scratch = adamw_scratch(self.buckets[0].exp_avg.device) if self.buckets else None
        for b in self.buckets:
            lr, (beta1, beta2), eps, wd = b.hyper["lr"], b.hyper["betas"], b.hyper["eps"], b.hyper["weight_decay"]
            grads = [c[0].grad if c[0].grad is not None else torch.zeros_like(c[0]) for c in b.copies]
            g = b.read_slice(grads, b.lo, b.shard)
            p = b.read_slice([c[0] for c in b.copies], b.lo, b.shard)
            # torch.optim.AdamW's single-tensor update, op for op, so the results agree to the last bit.
            adamw_update_(p, g, b.exp_avg, b.exp_avg_sq, t, lr, beta1, beta2, eps, wd, scratch)
            b.write_full(b.gather(p))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            for copies in b.copies:
                for p in copies:
                    if set_to_none:
                        p.grad = None
                    elif p.grad is not None:
                        p.grad.zero_()

    def state_bytes(self) -> int:
        """Optimizer-state bytes this rank holds (the two moments)."""
        return sum(b.exp_avg.numel() * b.exp_avg.element_size() * 2 for b in self.buckets)

    # -- checkpoints --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Layout-free optimizer state. Collective: every rank must call it.

        ``{"step": int, "param_groups": [{lr, betas, eps, weight_decay}, ...] (decay, no-decay),
        "state": {key: {"exp_avg": T, "exp_avg_sq": T}}}`` where ``key`` is the model's state-dict key of
        the parameter (per expert for routed experts: ``layers.3.mlp.experts.17.up_proj.weight``), so a
        checkpoint written with one PP/EP/DP layout loads into another. Each rank returns only the keys it
        is responsible for (GradSync.counted_here): the union over all ranks is the whole state, with no
        key twice. Moments keep their stored dtype (bf16 moments are saved as bf16); the master weights are the
        model parameters, saved with the model.
        """
        state: dict[str, dict[str, torch.Tensor]] = {}
        for b in self.buckets:
            full_m, full_v = b.gather(b.exp_avg), b.gather(b.exp_avg_sq)
            for name, copies, off in zip(b.names, b.copies, b.offsets):
                if not self.sync.counted_here(name):
                    continue
                shape, n = copies[0].shape, copies[0].numel()
                m, v = full_m[off: off + n].view(shape), full_v[off: off + n].view(shape)
                for key, (mk, vk) in self._keyed(name, m, v).items():
                    state[key] = {"exp_avg": mk.clone(), "exp_avg_sq": vk.clone()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"step": self.step_count, "param_groups": groups, "state": state}

    def load_state_dict(self, sd: dict) -> None:
        """Load a state written by ``state_dict`` (the union over the writing ranks, any layout). Each rank
        takes its own slices; every key its parameters need must be present. Moments saved in another dtype
        than this optimizer's ``moment_dtype`` are converted (rounded to nearest even into bf16)."""
        self.step_count = int(sd["step"])
        for mine, saved in zip(self.param_groups, sd["param_groups"]):
            mine.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()})
        for b in self.buckets:
            full_m = torch.zeros(b.shard * dist.get_world_size(b.group), device=b.exp_avg.device,
                                 dtype=b.exp_avg.dtype)
            full_v = torch.zeros_like(full_m)
            for name, copies, off in zip(b.names, b.copies, b.offsets):
                shape, n = copies[0].shape, copies[0].numel()
                m, v = full_m[off: off + n].view(shape), full_v[off: off + n].view(shape)
                for key, (mk, vk) in self._keyed(name, m, v).items():
                    if key not in sd["state"]:
                        raise CheckpointError(f"optimizer state for {key} is missing from the checkpoint")
                    entry = sd["state"][key]
                    if tuple(entry["exp_avg"].shape) != tuple(mk.shape):
                        raise CheckpointError(f"optimizer state for {key} has shape {tuple(entry['exp_avg'].shape)}"
                                              f" in the checkpoint, {tuple(mk.shape)} in the model")
                    mk.copy_(entry["exp_avg"])
                    vk.copy_(entry["exp_avg_sq"])
            b.exp_avg.copy_(full_m[b.lo: b.lo + b.shard])
            b.exp_avg_sq.copy_(full_v[b.lo: b.lo + b.shard])

    def _keyed(self, name: str, m: torch.Tensor, v: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """State-dict keys of a parameter and the matching views of its two moments."""
        if name not in self.sync.expert_modules:
            return {name: (m, v)}
        module, prefix, attr = self.sync.expert_modules[name]
        return {key: (m_view, v_view) for (key, m_view), (_, v_view)
                in zip(expert_views(module, prefix, attr, m), expert_views(module, prefix, attr, v))}


def expert_views(module: GroupedExperts, prefix: str, attr: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Per-expert views of a stacked expert tensor under the model's state-dict keys (see GroupedExperts)."""
    out = []
    for e in range(module.num_experts):
        key = f"{prefix}{module.expert_offset + e}"
        if attr == "gate_up_proj":
            out += [(f"{key}.gate_proj.weight", t[e, : module.inter]), (f"{key}.up_proj.weight", t[e, module.inter:])]
        else:
            out.append((f"{key}.{attr}.weight", t[e]))
    return out
