"""A decode step with static shapes, for ``torch.compile`` (``generate(..., compile=True)``).

A step that reads nothing back to the host and branches on no data can be traced once and replayed: the
cache is the KVCache's preallocated latent, written at a slot given as a tensor; attention runs over every
slot with a mask instead of a growing length; and the MoE computes its chosen experts on their weights
gathered by index (``GatheredDispatcher``) instead of on rows counted per expert. The model's modules run
as they are; only the cache view and the dispatcher differ from the eager step. Compiled by inductor
(CPU: C++ kernels; on CUDA with mode="reduce-overhead", i.e. CUDA graphs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from weakref import WeakKeyDictionary

import torch

from moelib.errors import ConfigError
from moelib.inference.cache import KVCache, visibility
from moelib.model.dispatch import LocalDispatcher, few_rows
from moelib.model.embedding import embedding_lookup
from moelib.model.rope import rope_cos_sin, rope_tables
from moelib.model.transformer import Transformer


class GatheredDispatcher(LocalDispatcher):
    """At few rows (decode), each (token, slot) pair's expert weights gathered by index, so the shapes do not
    depend on the routing: [N, k, 2I, H] and [N, k, H, I], multiplied and summed in one expression, which
    inductor turns into a reduction that reads the chosen weights in place. Else LocalDispatcher's path."""

    def run(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts,
            num_experts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not few_rows(indices, experts.num_experts):
            return super().run(x, indices, weights, experts, num_experts)
        gate, up = (x[:, None, None, :] * experts.gate_up_proj[indices]).sum(-1).chunk(2, dim=-1)
        # The gate value scales SwiGLU's output before the down projection, as GroupedExperts.compute does.
        hidden = torch.nn.functional.silu(gate) * up * weights.to(up.dtype)[..., None]  # [N, k, I]
        y = (hidden[:, :, None, :] * experts.down_proj[indices]).sum(-1)                # [N, k, H]
        counts = torch.zeros(experts.num_experts, dtype=torch.long, device=x.device)
        counts.index_add_(0, indices.reshape(-1), torch.ones_like(indices.reshape(-1)))
        return y.sum(1), counts


GATHERED = GatheredDispatcher()
SLOTS_MULTIPLE = 256  # cache lengths are rounded up to it, so requests of nearby lengths share a compiled step


def static_length(tokens: int) -> int:
    """The cache length a static step for ``tokens`` slots uses (a multiple of SLOTS_MULTIPLE)."""
    return -(-tokens // SLOTS_MULTIPLE) * SLOTS_MULTIPLE


@contextlib.contextmanager
def gathered_experts(model: Transformer) -> Iterator[None]:
    """Every MoE layer of ``model`` with a GatheredDispatcher inside the block (its own one after)."""
    moes = list(model.moe_layers().values())
    before = [m.dispatcher for m in moes]
    for m in moes:
        m.dispatcher = GATHERED
    try:
        yield
    finally:
        for m, d in zip(moes, before):
            m.dispatcher = d


def check_static(model: Transformer) -> None:
    """Raise a ConfigError naming compile=True when ``model`` cannot run the static step."""
    for moe in model.moe_layers().values():
        if type(moe.dispatcher) is not LocalDispatcher:
            raise ConfigError("compile=True (--compile) runs one process only; experts sharded over ranks "
                              "need the eager step")
        if not moe.experts.gate_up_proj.dtype.is_floating_point or moe.experts.gate_up_proj.element_size() < 2:
            raise ConfigError("compile=True (--compile) needs fp32 or bf16 weights (--dtype), not FP8-resident")


class _StaticLayerCache:
    """Layer i's view of the latent for a static step: writes the new rows at ``slots``, returns all slots."""

    def __init__(self, latent: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor, rank: int, absorb: bool):
        self.latent, self.mask, self.slots, self.rank, self.absorb = latent, mask, slots, rank, absorb

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.latent.index_copy_(1, self.slots, torch.cat([c_kv, k_pe], dim=-1).to(self.latent.dtype))
        return self.latent, self.mask


class StaticStep:
    """``step(tokens [B, t])``: the main model's normed output [B, t, hidden] for t tokens appended to
    ``cache`` (as ``Transformer.cached_hidden_states``), in a forward whose shapes the cache fixes; compiled
    when ``compile`` is set. Compiled forwards are kept per model, so later requests of the same shapes
    reuse them."""

    def __init__(self, model: Transformer, cache: KVCache, compile: bool = True):
        check_static(model)
        self.model, self.cache = model, cache
        self.keys = torch.arange(cache.max_len, device=cache.pad.device)
        self.forward = compiled(model, cache.absorb) if compile else partial(static_forward, model, cache.absorb)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        c, t = self.cache, tokens.shape[1]
        if c.length + t > c.max_len:
            raise ValueError(f"KVCache holds {c.max_len} slots; {c.length} used, {t} more asked for")
        with gathered_experts(self.model):
            h = self.forward(tokens, torch.tensor(c.length, device=c.pad.device), c.latent, c.pad, self.keys)
        c.length += t
        return h


_compiled: WeakKeyDictionary = WeakKeyDictionary()  # model -> {absorb: compiled static_forward}


def compiled(model: Transformer, absorb: bool) -> Callable:
    """``static_forward`` for ``model`` compiled by torch.compile (CUDA graphs on a GPU), made once."""
    per_model = _compiled.setdefault(model, {})
    if absorb not in per_model:
        mode = "reduce-overhead" if model.norm.weight.device.type == "cuda" else None
        per_model[absorb] = torch.compile(partial(static_forward, model, absorb), fullgraph=True, dynamic=False,
                                          mode=mode)
    return per_model[absorb]


def static_forward(model: Transformer, absorb: bool, tokens: torch.Tensor, slot: torch.Tensor,
                   latent: torch.Tensor, pad: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The normed output [B, t, hidden] of ``tokens`` [B, t] written at cache slots slot, slot + 1, ...
    (slot a 0-d LongTensor) of ``latent`` [layers, B, S, rank + rope], attending over all S slots (keys =
    arange(S)) with a mask; ``pad`` [B] as in KVCache."""
    slots = slot + torch.arange(tokens.shape[1], device=slot.device)
    mask, positions = visibility(slots, keys, pad)
    cos, sin = rope_cos_sin(model.inv_freq, positions, model.rope_factor)
    cos, sin = (t.to(model.norm.weight.dtype) for t in rope_tables(cos, sin))
    h = embedding_lookup(tokens, model.embed_tokens.weight)
    for i, layer in enumerate(model.layers.values()):
        h = layer(h, cos, sin, _StaticLayerCache(latent[i], mask, slots, model.cfg.kv_lora_rank, absorb))
    return model.norm(h)
