"""Large tensors made at the same size every step, kept between steps and written over (CPU only).

On CPU a fresh tensor of tens of MB comes straight from the OS (glibc maps blocks of 32 MB and more
afresh and trims its heap), and each of its pages is faulted in and zeroed on first touch. A training
step makes the same big tensors every time: the bf16 casts of the fp32 master weights (116M values in
``small``) and the head's [tokens, vocab] logits. Measured on the 2-core developer machines, writing into
a kept tensor took 1.5 ms for a [32, 512, 512] expert weight's cast against 3.4 ms into a fresh one, and
the head's GEMM 20 ms against 32 ms. GPUs have a caching allocator and get plain ``torch.empty``.

Inside ``keep()`` (which ``weight_cache.reuse()``, the training step's scope, enters), ``empty`` hands
out a kept tensor of the asked size, dtype and device only when nothing else holds it any more: no
autograd graph saved it (the previous step's is gone, or a retained graph would see it change), no view of
it and no Python name are alive. Otherwise it makes a new one and keeps that too, up to a few per owner
and kind. Tensors are kept per owner (a weight), weakly: they go when it does, or on ``release()``.
Outside ``keep()`` ``empty`` is ``torch.empty``.

Setting glibc's thresholds instead (mallopt: map only from 32 MB, trim only past 1 GB) cut a step's page
faults further (12,000 to 3,500) but made the step slower in three of four alternated runs; not done.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Hashable, Iterator

import torch
from torch.utils.weak import WeakIdKeyDictionary

_MAX_PER_KIND = 4  # e.g. the main loss and MTP heads each hold their logits until backward
_kept = WeakIdKeyDictionary()  # owner -> {(kind, shape, dtype): [tensors]}, all on the owner's device
_depth = 0


@contextlib.contextmanager
def keep() -> Iterator[None]:
    """``empty`` inside hands out kept tensors (CPU); they outlive the block."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def release() -> None:
    """Free every kept tensor."""
    _kept.clear()


def _refs(pool: list[torch.Tensor], i: int) -> int:
    return sys.getrefcount(pool[i])


# The references an unshared pool entry has when counted as in ``empty``: the pool's own, and the count's.
_ALONE = _refs([torch.empty(0)], 0)


def empty(owner: torch.Tensor, kind: Hashable, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor on ``owner``'s device; inside ``keep()`` on CPU, memory kept from earlier
    calls for ``owner`` and ``kind`` when nobody else holds it."""
    device = owner.device
    if _depth == 0 or device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    per_owner = _kept.get(owner)
    if per_owner is None:
        per_owner = _kept[owner] = {}
    pool = per_owner.setdefault((kind, tuple(shape), dtype), [])
    for i in range(len(pool)):
        # getrefcount counts Python names (and in recent torch C++ holders too, which hold the Python
        # object then); _use_count counts C++ holders in any torch: autograd's saved tensors, views.
        if pool[i]._use_count() == 1 and _refs(pool, i) == _ALONE:
            return pool[i]
    fresh = torch.empty(shape, dtype=dtype, device=device)
    if len(pool) < _MAX_PER_KIND:
        pool.append(fresh)
    return fresh

