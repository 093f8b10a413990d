"""AdamW with V3's settings: weight decay on matrices only (not on norms or biases), fp32 master weights,
and the two moments stored in fp32 or, as V3 does, in bf16.

bf16 moments: each step widens the stored moments to fp32, updates them there, steps the parameter with
those fp32 values and rounds them back to bf16 once when storing. The parameter update deliberately uses
the moments *before* rounding: that is what a fused kernel does (the fp32 values are in its registers; so
do Transformer Engine's FusedAdam and Megatron's precision-aware optimizer with bf16 moments), it costs
no second conversion, and a step's update then carries only the rounding error of earlier steps, never its
own (the first step equals the fp32 optimizer's exactly). ``adamw_update_`` (moelib.precision.adamw) is
the one implementation; both this module's ``AdamW`` and ZeRO-1 (moelib.parallel.zero) call it, so a
sharded run rounds exactly as a single process does. Gradients and master weights stay fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from moelib.config import TrainConfig
from moelib.precision.adamw import adamw_scratch, adamw_update_, moment_dtype_of


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose moments are stored in ``moment_dtype`` (torch.float32 or torch.bfloat16).

    With fp32 moments this *is* torch's AdamW (``fused`` as given). With bf16 moments ``step`` runs
    ``adamw_update_`` per parameter; amsgrad, maximize and the like are not supported there. The state
    dict keeps the stored dtype (bf16 moments are saved as bf16); ``load_state_dict`` converts moments of
    another dtype (an fp32 checkpoint into bf16 moments, or back).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, moment_dtype: str | torch.dtype = torch.float32,
                 fused: bool | None = None):
        self.moment_dtype = moment_dtype_of(moment_dtype)
        if self.moment_dtype != torch.float32:
            fused = None  # torch's fused kernel keeps moments in the parameter dtype
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)

    @torch.no_grad()
    def step(self, closure=None):
        if self.moment_dtype == torch.float32:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scratch = None
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("AdamW with bf16 moments supports neither amsgrad nor maximize")
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.float32:
                    raise TypeError(f"bf16 moments need fp32 master weights; a parameter is {p.dtype}")
                state = self.state[p]
                if not state:
                    # "step" as torch keeps it (a CPU float32 tensor), so state dicts stay interchangeable.
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                state["step"] = state["step"] + 1  # not in place: a loaded state dict may share it
                if scratch is None and p.device.type == "cpu":
                    scratch = adamw_scratch(p.device)
                adamw_update_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"].item()),
                              group["lr"], beta1, beta2, group["eps"], group["weight_decay"], scratch)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every floating state tensor to its parameter's dtype; put the moments back.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].dtype != self.moment_dtype:
                    state[key] = state[key].to(self.moment_dtype)
            if self.moment_dtype != torch.float32 and "step" in state:
                # A copy, since torch hands the caller's "step" over as it is; on the CPU, where our step keeps it.
                state["step"] = state["step"].detach().to("cpu", torch.float32, copy=True)

    def state_bytes(self) -> int:
        """Bytes held in the two moments (0 before the first step creates them)."""
        return sum(state[k].numel() * state[k].element_size() for state in self.state.values()
                   for k in ("exp_avg", "exp_avg_sq") if k in state)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> AdamW:
    """AdamW over ``param_groups`` with cfg's lr, betas, eps, weight decay and ``moment_dtype``."""
    # The fused kernel is ~5x faster than the multi-tensor one on CPU and exists for CPU and CUDA.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in model.parameters())
    return AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                 eps=cfg.adam_eps, moment_dtype=cfg.moment_dtype, fused=fused or None)
