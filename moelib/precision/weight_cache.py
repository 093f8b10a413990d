"""Weights cast or quantised once per optimizer step, not once per micro-batch.

A pipeline step runs many micro-batches through the same weights (DualPipe at least 2·PP of them), and
each forward and backward would otherwise cast every fp32 master weight to bf16, or quantise it into
128×128 FP8 blocks, again. As Transformer Engine's weight caching across micro-batches, the result is kept
and reused, but only inside ``reuse()``, which the training step wraps around its forwards and backwards
(never around the optimizer step). Outside it nothing is cached, so a user's own loop can never see a
stale copy: an optimizer cannot be relied on to announce its writes (torch's fused AdamW does not even
bump the parameters' version counters). Inside, the version counter and data pointer are still checked,
so an in-place write within the step is not missed either. Leaving the outermost ``reuse()`` drops every
copy; on CPU their memory is kept for the next step's casts (moelib.precision.kept).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from moelib.precision import kept

# Keyed by the weight object itself (identity, not value), dropped when the weight is.
_entries = WeakIdKeyDictionary()
_depth = 0  # > 0 inside reuse(); global, not per thread: autograd may run backward on its own threads


@contextlib.contextmanager
def reuse() -> Iterator[None]:
    """Reuse casts and quantisations of unchanged weights until the outermost ``reuse()`` exits."""
    global _depth
    _depth += 1
    try:
        with kept.keep():
            yield
    finally:
        _depth -= 1
        if _depth == 0:
            _entries.clear()


def cached(weight: torch.Tensor, key: Hashable, make: Callable[[], Any]) -> Any:
    """``make()`` for ``weight`` (e.g. its bf16 cast, keyed by what makes it); inside ``reuse()`` the result
    is kept and returned again while the weight is unchanged."""
    if _depth == 0:
        return make()
    stamp = (weight._version, weight.data_ptr())
    per_weight = _entries.get(weight)
    if per_weight is None:
        per_weight = _entries[weight] = {}
    hit = per_weight.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = make()
    per_weight[key] = (stamp, value)
    return value


def cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``, reused across the micro-batches of a step."""
    if weight.dtype == dtype:
        return weight
    return cached(weight, ("cast", dtype),
                  lambda: kept.empty(weight, "cast", weight.shape, dtype).copy_(weight.detach()))
