"""Executes a pipeline schedule's program on this rank with real transfers.

The programs come from ``schedule.py`` and follow its contract: ops run in order; an op first waits for
the messages it consumes (receives are posted as ``Schedule.recv_plan`` says, so untagged transports
match too); its outputs are sent without blocking; sends are waited on when the step ends. Each
micro-batch's loss is scaled by 1/M so the gradients of a step are those of the mean loss.

F&B ops (DualPipe) run the forward of one micro-batch and the backward of another through
``overlap.overlapped_forward_backward``, which interleaves them and keeps one side's expert all-to-all in
flight while the other computes. Deferred weight gradients (I then W) go through the precision layer's
weight-gradient store.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from moelib.model.transformer import LossOutput
from moelib.parallel.pipeline.comm import P2P
from moelib.parallel.pipeline.overlap import overlapped_forward_backward
from moelib.parallel.pipeline.schedule import Message, Schedule
from moelib.parallel.pipeline.segments import backward_steps, drain, forward_steps
from moelib.parallel.pipeline.stage import PipelineStage
from moelib.precision import weight_cache
from moelib.precision.weight_grad import WeightGradStore

_KIND = {"A": 0, "G": 1}


@dataclass
class StepStats:
    loss: float = 0.0          # sum over the micro-batches whose loss this rank computed, of loss / M
    lm_loss: float = 0.0
    mtp_loss: float = 0.0
    microbatches: int = 0      # how many losses this rank computed
    events: list[dict] = field(default_factory=list)


class PipelineRuntime:
    """One rank's executor. ``stages[c]`` is the PipelineStage of chunk c; ``pp_ranks[i]`` the global rank
    of pipeline rank i (this rank's pipeline group)."""

    def __init__(self, schedule: Schedule, pp_rank: int, stages: dict[int, PipelineStage], pp_ranks: list[int],
                 activation_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 mtp_weight: float = 0.3, record: bool = False):
        self.schedule, self.rank, self.stages, self.pp_ranks = schedule, pp_rank, stages, pp_ranks
        self.autocast, self.mtp_weight, self.record = autocast, mtp_weight, record
        self.p2p = P2P(activation_shape, dtype, device)
        self.set_schedule(schedule)
        # Runs the backward all-to-alls of F&B ops while this thread computes the other micro-batch.
        self._comm_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moelib-a2a-bwd")

    def set_schedule(self, schedule: Schedule) -> None:
        """Run the following steps with ``schedule`` (same pipeline, e.g. another micro-batch count)."""
        self.schedule = schedule
        self.program = schedule.programs[self.rank]
        self.plan = schedule.recv_plan(self.rank)

    # -- messages -----------------------------------------------------------------------------------

    def _post(self, msg: Message) -> None:
        direction = self.schedule.direction[msg.mb]
        buf, work = self.p2p.recv_start(self.pp_ranks[msg.src], _KIND[msg.kind], msg.mb * 1024 + msg.stage,
                                        direction)
        self._pending[(msg.kind, msg.mb, msg.stage)] = (buf, work)

    def _take(self, kind: str, mb: int, stage: int) -> torch.Tensor:
        key = (kind, mb, stage)
        if key in self._local:
            return self._local.pop(key)
        buf, work = self._pending.pop(key)
        start = time.perf_counter()
        work.wait()
        self._event("wait", "recv", start, time.perf_counter(), mb)
        return buf

    def _send(self, kind: str, mb: int, stage: int, tensor: torch.Tensor) -> None:
        direction = self.schedule.direction[mb]
        for msg in self.schedule.produces(self.rank, self._current):
            if msg.kind == kind and msg.mb == mb and msg.stage == stage:
                if msg.local:
                    self._local[(kind, mb, stage)] = tensor.detach().clone()
                else:
                    self.p2p.send(tensor, self.pp_ranks[msg.dst], _KIND[kind], mb * 1024 + stage, direction)
                return

    # -- the three kinds of work ----------------------------------------------------------------------

    def forward_steps(self, mb: int, chunk: int):
        """Forward of (mb, chunk) as a generator (it yields while an all-to-all is in flight)."""
        stage = self.stages[chunk]
        s = self.schedule.stage_of(self.rank, chunk)
        tokens, labels = self._batches[mb]
        x = tokens if s == 0 else self._take("A", mb, s - 1).requires_grad_(True)
        rec = yield from forward_steps(stage, x, labels if stage.spec.is_last else None, self.mtp_weight,
                                       self.autocast, self._comm_recorder(mb))
        self._saved[(mb, chunk)] = (x, rec)
        if isinstance(rec.output, LossOutput):
            self._record_loss(rec.output)
        else:
            self._send("A", mb, s, rec.output)

    def backward_steps(self, mb: int, chunk: int, defer_w: bool, comm_executor=None):
        """Backward of (mb, chunk) as a generator; with ``comm_executor`` its all-to-alls run there."""
        s = self.schedule.stage_of(self.rank, chunk)
        x, rec = self._saved.pop((mb, chunk))
        grad = None if isinstance(rec.output, LossOutput) else self._take("G", mb, s + 1)
        yield from backward_steps(rec, grad, self._loss_scale, defer_w, comm_executor, self._comm_recorder(mb))
        if s > 0:
            self._send("G", mb, s, x.grad)

    def weight_grad(self) -> None:
        WeightGradStore.pop()

    # -- the step -----------------------------------------------------------------------------------

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepStats:
        """Run this rank's program over the M micro-batches (each rank reads only the ones it needs)."""
        self._batches, self._loss_scale = batches, 1.0 / self.schedule.num_microbatches
        self._pending, self._local, self._saved = {}, {}, {}
        self._stats = StepStats()
        WeightGradStore.clear()
        with weight_cache.reuse():  # every micro-batch reuses one cast / quantisation of each weight
            self._run_program()
        self.p2p.wait_sends()
        assert not self._saved and not self._pending, "schedule left work behind"
        WeightGradStore.pop_all()
        return self._stats

    def forward_only(self, batches: list[tuple[torch.Tensor, torch.Tensor]], schedule: Schedule,
                     head: Callable[[PipelineStage, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Any]
                     ) -> list[Any]:
        """Run a forward-only program (``schedule.forward_only``) over the micro-batches without autograd.
        On a last stage ``head(stage, hidden, labels, cos, sin)`` replaces the loss; its results come back
        in program order (an empty list on ranks without a last stage). The training schedule stays set."""
        training = self.schedule
        self.set_schedule(schedule)
        self._batches, self._pending, self._local = batches, {}, {}
        results = []
        try:
            with torch.no_grad(), weight_cache.reuse():
                for k, op in enumerate(self.program):
                    self._current = op
                    for msg in self.plan[k]:
                        self._post(msg)
                    stage, s = self.stages[op.chunk], schedule.stage_of(self.rank, op.chunk)
                    tokens, labels = batches[op.mb]
                    with self.autocast():
                        h, cos, sin = stage.trunk(tokens if s == 0 else self._take("A", op.mb, s - 1))
                        if stage.spec.is_last:
                            results.append(head(stage, h, labels, cos, sin))
                        else:
                            self._send("A", op.mb, s, h)
            self.p2p.wait_sends()
        finally:
            self.set_schedule(training)
        return results

    def _run_program(self) -> None:
        for k, op in enumerate(self.program):
            self._current = op
            for msg in self.plan[k]:
                self._post(msg)
            start = time.perf_counter()
            if op.kind == "F":
                drain(self.forward_steps(op.mb, op.chunk))
            elif op.kind in ("B", "I"):
                drain(self.backward_steps(op.mb, op.chunk, defer_w=op.kind == "I"))
            elif op.kind == "W":
                self.weight_grad()
            else:
                overlapped_forward_backward(self, op, self._comm_thread)
            if self.record:
                self._stats.events.append({"rank": self.rank, "kind": op.kind, "mb": op.mb, "chunk": op.chunk,
                                           "b_mb": op.b_mb, "b_chunk": op.b_chunk, "start": start,
                                           "end": time.perf_counter(), "stream": "compute"})

    def _event(self, stream: str, kind: str, start: float, end: float, mb: int) -> None:
        if self.record:
            self._stats.events.append({"rank": self.rank, "kind": kind, "mb": mb, "chunk": 0, "start": start,
                                       "end": end, "stream": stream})

    def _comm_recorder(self, mb: int):
        return lambda kind, start, end: self._event("all-to-all", kind, start, end, mb)

    def _record_loss(self, out: LossOutput) -> None:
        st = self._stats
        st.loss += float(out.loss.detach()) * self._loss_scale
        st.lm_loss += float(out.lm_loss.detach()) * self._loss_scale
        if out.mtp_losses:
            st.mtp_loss += float(torch.stack(out.mtp_losses).detach().mean()) * self._loss_scale
        st.microbatches += 1
