"""FP8 numerics telemetry: per-Linear underflow and saturation counts and an amax history.

Each FP8 GEMM operand is quantised online from its tiles' amax, so nothing can overflow; what can go
wrong is at the bottom and the top of each tile's range. Per quantised tensor ("input", "weight",
and "grad": the output gradient as the input-grad GEMM quantises it) a sampled call records:

* ``numel``      elements quantised.
* ``underflow``  non-zero elements that became zero in fp8: below half the smallest subnormal of their
                 tile's scale (2^-10·s for E4M3), i.e. more than ~2^17 below the tile's amax. These are
                 lost entirely, the signal that tiles mix magnitudes too far apart.
* ``subnormal``  non-zero elements landing in fp8's subnormal range (|q| < 2^-6): kept, with fewer than
                 3 significant bits. Underflow's early warning.
* ``saturated``  elements at the top code, |q| = 448. With online amax scaling that is exactly each
                 non-zero tile's amax element (plus ties), and none with power-of-two scales unless the
                 amax is a power of two times 448, so ``saturated - tiles`` (both reported) above zero
                 means ties at the amax; with delayed or static scales (not used here) it would count
                 clipping.
* ``tiles``      non-zero tiles (for reading ``saturated``).
* ``amax``       the tensor's amax, kept for the last ``amax_history_len`` sampled calls.

Only every ``PrecisionConfig.telemetry_interval``-th call of a Linear is sampled (one call per step
without gradient accumulation), and an unsampled call costs one integer increment, so logging every N
steps is cheap. The counters live on the weight Parameter (``weight.fp8_telemetry``), so experts stacked
in one grouped weight share one record.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

from moelib.precision import fp8

KINDS = ("input", "weight", "grad")
ATTR = "fp8_telemetry"
_FIELDS = ("numel", "underflow", "subnormal", "saturated", "tiles")


class Fp8Telemetry:
    def __init__(self, interval: int, history_len: int):
        self.interval, self.calls = interval, 0
        self.counts = {k: dict.fromkeys(_FIELDS, 0) for k in KINDS}
        self.amax = {k: deque(maxlen=history_len) for k in KINDS}

    def sample(self) -> bool:
        """True on every ``interval``-th call (the first included)."""
        self.calls += 1
        return (self.calls - 1) % self.interval == 0

    @torch.no_grad()
    def record(self, kind: str, x: torch.Tensor, data: torch.Tensor, block: tuple[int, int]) -> None:
        """Count one quantisation: x (2-D, or [E, N, K] for stacked expert weights) became ``data``."""
        fmt = fp8.FORMATS[fp8.format_of(data.dtype)]
        q = data.float().abs()
        nonzero = x != 0
        c = self.counts[kind]
        c["numel"] += x.numel()
        c["underflow"] += int((nonzero & (q == 0)).sum())
        c["subnormal"] += int((nonzero & (q > 0) & (q < 2.0 ** (1 - fmt.exponent_bias))).sum())
        c["saturated"] += int((q == fmt.fmax).sum())
        mats = nonzero.float().reshape(-1, *x.shape[-2:])
        c["tiles"] += sum(int((fp8._tiled(m, block).amax(dim=(1, 3)) > 0).sum()) for m in mats)
        self.amax[kind].append(float(x.abs().amax()) if x.numel() else 0.0)

    def as_dict(self, reset: bool = True) -> dict:
        out = {k: {**self.counts[k], "amax_history": list(self.amax[k])} for k in KINDS if self.counts[k]["numel"]}
        if reset:
            self.counts = {k: dict.fromkeys(_FIELDS, 0) for k in KINDS}
        return out


def telemetry_for(weight: torch.Tensor, interval: int, history_len: int) -> Fp8Telemetry | None:
    """The record attached to ``weight`` (created on first use), or None when telemetry is off."""
    if interval <= 0:
        return None
    record = getattr(weight, ATTR, None)
    if record is None:
        record = Fp8Telemetry(interval, history_len)
        setattr(weight, ATTR, record)
    return record


def collect_telemetry(model: nn.Module, reset: bool = True) -> dict[str, dict]:
    """``{parameter name: {"input"|"weight"|"grad": counts and amax_history}}`` for every FP8 weight that
    recorded something since the last collection; counts restart from zero when ``reset``."""
    out = {}
    for name, p in model.named_parameters():
        record = getattr(p, ATTR, None)
        if record is not None:
            stats = record.as_dict(reset)
            if stats:
                out[name] = stats
    return out
