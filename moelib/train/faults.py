"""Surviving bad steps and stop requests.

A non-finite loss or gradient skips the step (the engine drops its update); after ``max_in_a_row`` such
steps the run stops with an error instead of spinning. SIGTERM or SIGINT on any rank asks every rank to
stop after the current step; the request is agreed by an all-reduce, so all ranks save one checkpoint
together and exit cleanly.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from moelib.errors import MoelibError


class TooManySkippedSteps(MoelibError):
    pass


class SkipGuard:
    def __init__(self, max_in_a_row: int):
        self.max_in_a_row, self.in_a_row = max_in_a_row, 0

    def update(self, skipped: bool, step: int) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.max_in_a_row > 0 and self.in_a_row >= self.max_in_a_row:
            raise TooManySkippedSteps(f"{self.in_a_row} steps in a row after step {step} had a non-finite loss or "
                                      "gradient; stopping (lower --lr, check the data, or resume from a checkpoint)")


class StopRequest:
    """Installs SIGTERM/SIGINT handlers that only set a flag; ``agreed()`` is collective."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested, self.signal_name = True, signal.Signals(signum).name

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
