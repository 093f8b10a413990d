"""Weight gradients written straight into ``weight.grad``: now, or later in a zero-bubble W step.

``accumulate_weight_grad`` is Megatron's gradient-accumulation fusion: a Linear's backward hands autograd
None for its weight and writes dW into the fp32 ``.grad`` itself, so no whole dW in the compute dtype is made,
cast to fp32 and added again (those two passes over the routed experts' gradients took 3x their GEMMs'
time on CPU). ``WeightGradStore`` defers those writes (Zero Bubble's B/W split, DualPipe's interface).

``fresh_grads`` replaces ``optimizer.zero_grad(set_to_none=False)`` around a step's backward passes: the
gradient buffers are kept, but instead of being zeroed first they are marked, and the first write of the
step overwrites a marked buffer (for the GEMMs here: computes into it). Autograd's own accumulation (norms,
the embedding) meets a marked buffer through a hook that zeroes it just before; whatever nothing wrote is
zeroed when the block ends. So the gradients leaving the block are exactly those of a zeroed start, without
a pass over every gradient (13 ms of a 600 ms ``small`` step on CPU) or the read of zeros in every first add.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.utils.weak import WeakIdKeyDictionary, WeakIdRef


class WeightGradStore:
    """Deferred weight-grad GEMMs for the zero-bubble B/W split, with DualPipe's interface.

    While ``enabled``, moelib's Linears (bf16/fp32 and FP8, dense and grouped, and the LM head) compute dX
    only in backward and ``put`` a closure that computes dW into ``weight.grad`` (``accumulate_weight_grad``).
    ``flush()`` closes the closures queued so far into one group (one micro-batch's backward); ``pop()``
    runs the oldest group, ``pop_all()`` every group. An FP8 closure holds the fp8 operands (dYᵀ quantised
    at once, the input's fp8 cache), not the bf16 gradient. Each ``deferred()`` block queues exactly one
    group, empty when nothing was deferred (Transformer Engine's Linears compute dW inside backward), so a
    schedule can pair every deferred B with one ``pop()``.
    Weights that are not leaves (a cast or view) cannot receive a ``.grad`` later, so theirs is computed
    at once.
    """

    enabled = False
    _cache: list[Callable[[], None]] = []
    _queue: deque[list[Callable[[], None]]] = deque()

    @classmethod
    @contextlib.contextmanager
    def deferred(cls) -> Iterator[None]:
        """Queue weight grads for the backward passes run inside; the group is flushed on exit."""
        prev, cls.enabled = cls.enabled, True
        try:
            yield
        finally:
            cls.enabled = prev
            cls._queue.append(cls._cache)
            cls._cache = []

    @classmethod
    @contextlib.contextmanager
    def deferring(cls, enabled: bool) -> Iterator[None]:
        """Queue (or not) the weight grads of the backward passes run inside, without closing a group:
        a pipeline runs one micro-batch's backward in several pieces, then calls ``end_group``."""
        prev, cls.enabled = cls.enabled, enabled
        try:
            yield
        finally:
            cls.enabled = prev

    @classmethod
    def end_group(cls) -> None:
        """Close the group of weight grads queued so far, even an empty one, so that each deferring
        backward has exactly one group for its W to pop."""
        cls._queue.append(cls._cache)
        cls._cache = []

    @classmethod
    def put(cls, fn: Callable[[], None]) -> None:
        cls._cache.append(fn)

    @classmethod
    def flush(cls) -> None:
        if cls._cache:
            cls._queue.append(cls._cache)
            cls._cache = []

    @classmethod
    def pop(cls) -> None:
        """Run the oldest flushed group of weight-grad GEMMs."""
        if not cls._queue:
            raise RuntimeError("WeightGradStore.pop: no deferred weight-grad group is queued (flush first).")
        with torch.no_grad():  # a W step is a backward computation, whoever calls it
            for fn in cls._queue.popleft():
                fn()

    @classmethod
    def pop_all(cls) -> None:
        cls.flush()
        while cls._queue:
            cls.pop()

    @classmethod
    def pending(cls) -> int:
        """Groups queued (plus one for closures not yet flushed)."""
        return len(cls._queue) + bool(cls._cache)

    @classmethod
    def clear(cls) -> None:
        cls._cache, cls._queue = [], deque()


# A parameter whose .grad holds an earlier step's values, to be overwritten by its first write: the
# parameter -> that very gradient tensor (a .grad replaced since is not stale).
_stale = WeakIdKeyDictionary()
_hooked = WeakIdKeyDictionary()  # parameters that carry the zeroing hook -> its handle


def _take_stale(param: torch.Tensor) -> bool:
    """Whether ``param.grad`` still holds an earlier step's values; the mark is cleared either way."""
    grad = _stale.pop(param, None)
    return grad is not None and grad is param.grad


def _zeroing_hook(param: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A tensor hook: runs just before autograd adds a gradient into ``param.grad``."""
    ref = WeakIdRef(param)  # the hook must not keep its parameter alive

    def hook(grad: torch.Tensor) -> None:
        param = ref()
        if param is not None and _take_stale(param):
            param.grad.zero_()

    return hook


@contextlib.contextmanager
def fresh_grads(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Gradients accumulated inside start from zero, as after ``zero_grad(set_to_none=False)``, and keep
    their buffers; read them after the block (a marked one still holds its old values inside it)."""
    params = [p for p in params if p.grad is not None]
    for p in params:
        if p.requires_grad and p not in _hooked:
            _hooked[p] = p.register_hook(_zeroing_hook(p))
        _stale[p] = p.grad
    try:
        yield
    finally:
        for p in params:
            if _take_stale(p):
                p.grad.zero_()


def accumulate_weight_grad(weight: torch.Tensor,
                           write_into: Callable[[torch.Tensor, bool], None]) -> torch.Tensor | None:
    """``write_into(grad, accumulate)`` puts dW into ``weight.grad`` (adds it, or overwrites a fresh or stale
    buffer with ``accumulate=False``), now or in WeightGradStore's W step; autograd gets None. A weight
    that is not a leaf gets its dW returned instead."""
    if not weight.is_leaf:
        grad = torch.empty_like(weight)
        write_into(grad, False)
        return grad

    def run() -> None:
        with torch.no_grad():
            fresh = _take_stale(weight) or weight.grad is None
            if weight.grad is None:
                weight.grad = torch.empty_like(weight)
            write_into(weight.grad, not fresh)

    if WeightGradStore.enabled:
        WeightGradStore.put(run)
    else:
        run()
    return None


def write_(out: torch.Tensor, value: torch.Tensor, accumulate: bool) -> None:
    """out += value, or out = value."""
    if accumulate:
        out.add_(value)
    else:
        out.copy_(value)


def add_mm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = True) -> None:
    """out += a @ b (or out = a @ b), in one GEMM when the dtypes agree (fp32), else the product rounded to
    a's dtype and written ~1 MB of ``out`` at a time, while it is in cache (one add of a [16k, 512] bf16
    product into fp32 took 1.5x the time of its GEMM on CPU)."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    rows = max(1, (1 << 20) // (out.element_size() * out.shape[-1]))
    for r in range(0, out.shape[0], rows):
        write_(out[r:r + rows], torch.mm(a[r:r + rows], b), accumulate)
