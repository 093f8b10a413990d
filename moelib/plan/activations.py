"""Activation bytes per token of one decoder layer, measured on the real model and scaled by shape.

What backward holds is measured as ``bench.py memory`` does: every storage an op creates during a layer's
forward is tracked by weak reference (a TorchDispatchMode sees every op, inside custom autograd functions
and checkpoint regions too); those still alive when the forward returns, minus its output, are what
backward holds (saved tensors, checkpoint inputs, FP8 caches). Per token = the slope between two batch
sizes, so per-step constants (weight casts, RoPE tables) cancel.

A 671B layer does not fit on a CPU, so the layer is measured on proxies whose widths (hidden, FFN and
expert widths, LoRA ranks, head count) are the target's divided by k, with head dims, expert counts and
top-k kept. Every tensor a layer holds per token is one such width or a fixed one (the shared RoPE key,
router scores), so the bytes are affine in 1/k: two proxies (k and 2k) give the line, evaluated at k = 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moelib.config import ModelConfig
from moelib.errors import ConfigError
from moelib.model import build_model
from moelib.model.moe import GroupedExperts
from moelib.train.recompute import apply_recompute

# Widths divided by the proxy factor; everything else (head dims, expert counts, top-k) is kept.
SCALED = ("hidden_size", "intermediate_size", "moe_intermediate_size", "q_lora_rank", "kv_lora_rank",
          "num_attention_heads")
PROXY_HIDDEN = 256  # the first proxy's hidden size is at most this (small enough for a CPU)


class LiveStorages(TorchDispatchMode):
    """Tracks every storage an op returns, by weak reference, except the model's parameters, their
    gradients and buffers (a detach, a view or an in-place add returns those); ``live()`` sums those
    still alive."""

    def __init__(self, model: torch.nn.Module, track_peak: bool = False):
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.ignore = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers(), *grads)}
        self.track_peak, self.peak = track_peak, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.add(t)
        if self.track_peak:
            self.peak = max(self.peak, self.live())
        return out

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.ignore:
            return
        known = self.refs.get(key)
        if known is None or known[0].expired():
            self.refs[key] = (StorageWeakRef(storage), storage.nbytes())

    def live(self, exclude: tuple[torch.Tensor, ...] = ()) -> int:
        self.refs = {k: v for k, v in self.refs.items() if not v[0].expired()}
        skip = {t.untyped_storage()._cdata for t in exclude}
        return sum(n for k, (_, n) in self.refs.items() if k not in skip)


def configure(model, mode: str):
    """Recompute ``mode`` on a built model; expert rows never take the CPU's equal-groups layout, whose
    padding depends on how evenly a batch routes (the measurement would jump with the batch)."""
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.equal_groups_up_to = 1.0
    exact = mode == "selective-exact"
    return apply_recompute(model, "selective" if exact else mode, fp8_swiglu_cache=False if exact else None)


class HeldBreakdown(LiveStorages):
    """LiveStorages that also labels each storage by the module whose forward made it (its name inside the
    layer), the innermost moelib function that made it (with its ``name`` argument, where it has one: which
    Linear an FP8 input belongs to) and its dtype; ``live_by_label()`` sums the live bytes per label."""

    def __init__(self, model: torch.nn.Module, layer: torch.nn.Module):
        super().__init__(model)
        self.labels: dict[int, tuple[str, str, str]] = {}
        self.stack: list[str] = ["(layer)"]
        self.handles = []
        for name, module in layer.named_modules():
            self.handles.append(module.register_forward_pre_hook(functools.partial(self._enter, name or "(layer)")))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str, module, args) -> None:
        self.stack.append(name)

    def _leave(self, module, args, output) -> None:
        self.stack.pop()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)

    def add(self, t: torch.Tensor) -> None:
        super().add(t)
        key = t.untyped_storage()._cdata
        if key in self.refs and key not in self.labels:
            self.labels[key] = (self.stack[-1], _site(), str(t.dtype).replace("torch.", ""))

    def live_by_label(self, exclude: tuple[torch.Tensor, ...] = ()) -> dict[tuple[str, str, str], int]:
        self.live()
        skip = {t.untyped_storage()._cdata for t in exclude}
        out: dict[tuple[str, str, str], int] = {}
        for key, (_, n) in self.refs.items():
            if key not in skip:
                label = self.labels.get(key, ("?", "?", "?"))
                out[label] = out.get(label, 0) + n
        return out


_NOT_SITES = ("moelib/precision/fp8.py", "moelib/plan/", "torch/")


def _site() -> str:
    """The innermost moelib function on the stack outside the quantiser and this module, with the ``name``
    string it was given (if any)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "moelib/" in path and not any(p in path for p in _NOT_SITES):
            name = frame.f_locals.get("name")
            where = frame.f_code.co_qualname
            named = isinstance(name, str) and not name.startswith("Linear(")  # a Linear's module says which
            return f"{where}({name})" if named else where
        frame = frame.f_back
    return "?"


def _measure(cfg: ModelConfig, backend: str, recompute: str, kind: str, seq: int, seed: int,
             by_label: bool) -> dict[tuple, float]:
    """Per-token bytes backward holds for the first ``kind`` layer of ``cfg``: {(): total}, or per label."""
    index = 0 if kind == "dense" else cfg.first_k_dense_replace
    small = dataclasses.replace(cfg, num_hidden_layers=cfg.first_k_dense_replace + 1, num_nextn_predict_layers=0,
                                max_position_embeddings=max(seq, cfg.max_position_embeddings))
    model = configure(build_model(small, backend, seed=seed), recompute)
    model.train()
    layer = model.layers[str(index)]
    cos, sin = model.rope(seq, torch.device("cpu"))
    held = []
    for batch in (2, 4):
        base = torch.randn(batch, seq, cfg.hidden_size, generator=torch.Generator().manual_seed(seed),
                           requires_grad=True)
        tracker = HeldBreakdown(model, layer) if by_label else LiveStorages(model)
        with tracker, model.backend.autocast("cpu"):
            hidden = base.clone()  # made here so that it is counted if (and only if) the layer keeps it
            out = layer(hidden, cos, sin)
            del hidden
        held.append(tracker.live_by_label(exclude=(out,)) if by_label else {(): tracker.live(exclude=(out,))})
        del out  # frees the graph (a backward would only cost time)
    return {k: (held[1].get(k, 0) - held[0].get(k, 0)) / (2 * seq) for k in held[0].keys() | held[1].keys()}


def held_per_token(cfg: ModelConfig, backend: str, recompute: str, kind: str, seq: int, seed: int = 1234) -> float:
    """Bytes per token that backward holds for the first ``kind`` ("dense" or "moe") layer of ``cfg``."""
    return _measure(cfg, backend, recompute, kind, seq, seed, by_label=False)[()]


def held_breakdown(cfg: ModelConfig, backend: str, recompute: str, kind: str, seq: int,
                   seed: int = 1234) -> dict[tuple[str, str, str, int], float]:
    """Bytes per token backward holds for the first ``kind`` layer, per (module inside the layer, function
    that made the storage, dtype) (see HeldBreakdown); the values sum to ``held_per_token``."""
    return {k: v for k, v in _measure(cfg, backend, recompute, kind, seq, seed, by_label=True).items() if v}


def proxy(cfg: ModelConfig, k: int) -> ModelConfig:
    """``cfg`` with every width in SCALED divided by ``k`` (each must divide exactly)."""
    changes = {}
    for name in SCALED:
        value = getattr(cfg, name)
        if value is not None:
            changes[name] = value // k
    return dataclasses.replace(cfg, **changes)


def proxy_factors(cfg: ModelConfig) -> tuple[int, int]:
    """(k, 2k): k the smallest power of two >= 2 bringing hidden_size to PROXY_HIDDEN or below, as far as
    4k still divides every width in SCALED (so that both proxies are exact shrinks)."""
    widths = [getattr(cfg, n) for n in SCALED if getattr(cfg, n) is not None]
    if not all(w % 4 == 0 for w in widths):
        raise ConfigError("ModelConfig: activation planning shrinks the layer's widths (hidden_size, FFN and "
                          "expert widths, LoRA ranks, num_attention_heads) by 2 and 4, so each must be a "
                          "multiple of 4")
    k = 2
    while cfg.hidden_size // k > PROXY_HIDDEN and all(w % (4 * k) == 0 for w in widths):
        k *= 2
    return k, 2 * k


@functools.lru_cache(maxsize=64)
def _layer_bytes_cached(cfg_json: str, backend: str, recompute: str, seq: int) -> tuple[float, float]:
    cfg = ModelConfig.from_dict(json.loads(cfg_json))
    k1, k2 = proxy_factors(cfg)
    out = []
    for kind in ("dense", "moe"):
        b1 = held_per_token(proxy(cfg, k1), backend, recompute, kind, seq)
        b2 = held_per_token(proxy(cfg, k2), backend, recompute, kind, seq)
        out.append(_extrapolate(b1, b2, k1, k2))
    return out[0], out[1]


def layer_bytes_per_token(cfg: ModelConfig, backend: str, recompute: str, seq: int) -> dict[str, float]:
    """{"dense": bytes, "moe": bytes} per token that backward holds for one decoder layer of ``cfg`` under
    this precision backend and recompute mode, extrapolated from two shrunken proxies of the real layer."""
    dense, moe = _layer_bytes_cached(json.dumps(cfg.to_dict(), sort_keys=True), backend, recompute, seq)
    return {"dense": dense, "moe": moe}


def _extrapolate(b1: float, b2: float, k1: int, k2: int) -> float:
    """bytes = A / k + C through (1/k1, b1) and (1/k2, b2), at 1/k = 1."""
    slope = (b1 - b2) / (1 / k1 - 1 / k2)
    return b2 + slope * (1 - 1 / k2)


def layer_breakdown_per_token(cfg: ModelConfig, backend: str, recompute: str, kind: str,
                              seq: int) -> dict[tuple[str, str, str], float]:
    """``held_breakdown`` of one ``kind`` layer of ``cfg`` extrapolated from its two proxies, label by label."""
    k1, k2 = proxy_factors(cfg)
    b1 = held_breakdown(proxy(cfg, k1), backend, recompute, kind, seq)
    b2 = held_breakdown(proxy(cfg, k2), backend, recompute, kind, seq)
    out = {k: _extrapolate(b1.get(k, 0.0), b2.get(k, 0.0), k1, k2) for k in b1.keys() | b2.keys()}
    return {k: v for k, v in out.items() if round(v)}
