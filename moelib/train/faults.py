"""Surviving bad steps and stop requests.

A non-finite loss or gradient skips the step (the engine drops its update); after ``max_in_a_row`` such
steps the run stops with an error instead of spinning. SIGTERM, SIGINT or SIGUSR1 on any rank asks every
rank to stop after the current step; the request is agreed by an all-reduce, so all ranks save one
checkpoint together and exit cleanly. (mpirun kills its ranks a fraction of a second after it gets SIGINT
or SIGTERM itself, too soon for any save, but forwards SIGUSR1 and waits: moelib.parallel.mpirun turns the
former into the latter.) A wall-clock timer asks for a save every N minutes the same way.
"""

from __future__ import annotations

import signal
import time

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


def agree(*flags: bool) -> list[bool]:
    """Each flag true on any rank, on every rank (one all-reduce). Collective."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


class SaveTimer:
    """Due once ``minutes`` of wall time have passed since the start or the last save (0: never)."""

    def __init__(self, minutes: float):
        self.seconds, self.last = minutes * 60, time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds

    def saved(self) -> None:
        self.last = time.monotonic()


class StopRequest:
    """Installs SIGTERM/SIGINT/SIGUSR1 handlers that only set a flag (``agree`` it across ranks)."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested, self.signal_name = True, signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
