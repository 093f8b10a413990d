"""The AdamW update arithmetic with moments stored in fp32 or bf16: one implementation, below every caller.

``adamw_update_`` is called by the single-process optimizer (moelib.train.optimizer.AdamW) and by ZeRO-1
(moelib.parallel.zero), so a sharded run rounds exactly as a single process does. It lives in the precision
layer because what it decides is numeric (when bf16 moments are rounded, see moelib.train.optimizer), and
so that parallel/ does not import train/ to reach it.
"""

from __future__ import annotations

import math

import torch

MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def moment_dtype_of(name: str | torch.dtype) -> torch.dtype:
    """``"fp32"``/``"bf16"`` (TrainConfig.moment_dtype) or a torch dtype -> the torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in MOMENT_DTYPES.values():
            raise ValueError(f"moment dtype must be float32 or bfloat16, got {name}")
        return name
    if name not in MOMENT_DTYPES:
        raise ValueError(f"moment dtype must be 'fp32' or 'bf16', got {name!r}")
    return MOMENT_DTYPES[name]


# Elements per piece of an update on CPU: the fp32 temporaries of a piece (512 KB each) stay in cache through
# its dozen passes, which otherwise each stream the whole tensor through memory.
CPU_CHUNK = 1 << 17


def adamw_scratch(device: torch.device | str) -> torch.Tensor | None:
    """Working memory for ``adamw_update_`` on CPU (None elsewhere, where updates run whole), made once per
    step by a caller that updates many tensors."""
    return torch.empty(3, CPU_CHUNK) if torch.device(device).type == "cpu" else None


@torch.no_grad()
def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                  scratch: torch.Tensor | None = None) -> None:
    """One AdamW step in place on fp32 ``param`` (any shape, or a flat shard) with moments in fp32 or bf16.

    torch.optim.AdamW's single-tensor update op for op (decoupled weight decay, bias corrections), so
    with fp32 moments it agrees with torch to the last bit. Moments of another dtype than ``param`` are
    computed in fp32 and rounded (to nearest even) once, when stored; the update uses the unrounded values.
    On CPU the update runs CPU_CHUNK elements at a time (every op is elementwise: the same bits), in
    ``scratch`` (``adamw_scratch``) when given.
    """
    tensors = (param, grad, exp_avg, exp_avg_sq)
    if param.device.type != "cpu" or not all(t.is_contiguous() for t in tensors):
        _adamw_piece_(*tensors, None, step, lr, beta1, beta2, eps, weight_decay)
        return
    if scratch is None:
        scratch = torch.empty(3, min(CPU_CHUNK, param.numel()))
    flat = [t.view(-1) for t in tensors]
    for s in range(0, param.numel(), CPU_CHUNK):
        _adamw_piece_(*(t[s:s + CPU_CHUNK] for t in flat), scratch, step, lr, beta1, beta2, eps, weight_decay)


def _adamw_piece_(param, grad, exp_avg, exp_avg_sq, scratch, step, lr, beta1, beta2, eps, weight_decay):
    def work(i: int) -> torch.Tensor:  # an fp32 temporary shaped like param
        return torch.empty_like(param) if scratch is None else scratch[i, : param.numel()].view_as(param)

    wide = exp_avg.dtype != param.dtype
    m = work(0).copy_(exp_avg) if wide else exp_avg
    v = work(1).copy_(exp_avg_sq) if wide else exp_avg_sq
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = torch.sqrt(v, out=work(2)).div_(math.sqrt(1 - beta2 ** step)).add_(eps)
    param.addcdiv_(m, denom, value=-step_size)
    if wide:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
