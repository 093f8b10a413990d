"""A stage's forward recorded as autograd segments cut at the expert all-to-alls.

Each MoE layer runs as: [attention + router] | dispatch all-to-all | [experts] | combine all-to-all |
[shared experts + residual ...]. Every cut replaces a tensor by a detached leaf, so the backward can run
one segment at a time, in reverse: ``torch.autograd.backward(segment outputs, grads of their leaves)``
fills the grads of the earlier leaves it reaches. That is what lets the overlapped schedule run a
communication segment (forward or backward) while the other micro-batch computes.

Both passes are generators that ``yield`` while an all-to-all is in flight; drained without
interleaving, they are an ordinary forward and backward (and give the same numbers as the plain model).

A cut would keep its tensors alive until its segment's backward, bytes the plain layer frees (under
selective recompute, h1, the dispatched rows and the expert outputs are kept by no node: FP8 copies or
recomputations stand in for them). So the forward notes every storage autograd saves and, once done, frees
the cut tensors none of them is: they keep their shape (the backward only needs that of an output to pass
its gradient) but no memory, so an op that did read one would crash (not compute on stale values).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from moelib.model.moe import MoE
from moelib.model.transformer import LossOutput
from moelib.parallel.pipeline.stage import PipelineStage
from moelib.precision.weight_grad import WeightGradStore


@dataclass
class Segment:
    outputs: list[torch.Tensor]   # graph-attached tensors that end the segment
    leaves: list[torch.Tensor]    # their detached stand-ins, consumed by later segments
    comm: bool                    # the segment is an all-to-all (its backward is one too)


@dataclass
class SegmentedPass:
    segments: list[Segment] = field(default_factory=list)
    output: torch.Tensor | LossOutput | None = None
    saved: dict[int, StorageWeakRef] = field(default_factory=dict)  # storages autograd saved, by key

    def cut(self, *tensors, comm: bool = False):
        """End the current segment at ``tensors``; returns them as leaves (non-differentiable ones as is)."""
        outputs, leaves, result = [], [], []
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                leaf = t.detach().requires_grad_(True)
                outputs.append(t)
                leaves.append(leaf)
                result.append(leaf)
            else:
                result.append(t)
        self.segments.append(Segment(outputs, leaves, comm))
        return tuple(result)

    @contextlib.contextmanager
    def recording(self):
        """Notes the storage of every tensor autograd saves meanwhile. Entered and left between yields only:
        the hooks are a per-thread stack, which an interleaved pass must not see."""
        def pack(t: torch.Tensor) -> torch.Tensor:
            self.hold(t)
            return t  # as is: a detached alias changes what some backward reads (the pipeline parity tests)

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def hold(self, t: torch.Tensor) -> None:
        """Keeps ``t`` from ``free_unsaved``: for a tensor that backward reads outside autograd's saved tensors."""
        self.saved[t.untyped_storage()._cdata] = StorageWeakRef(t.untyped_storage())

    def free_unsaved(self) -> None:
        """Frees the storage of every cut tensor that no autograd node saved (see the module docstring),
        except the pass's output, which is sent on."""
        saved = {k for k, ref in self.saved.items() if not ref.expired()}
        if isinstance(self.output, torch.Tensor):
            saved.add(self.output.untyped_storage()._cdata)
        for seg in self.segments:
            for t in seg.outputs:  # each leaf shares its output's storage
                if t.untyped_storage()._cdata not in saved:
                    t.untyped_storage().resize_(0)
        self.saved.clear()


Recorder = Callable[[str, float, float], None]  # (name, start, end): an all-to-all's time in flight


def _no_record(name: str, start: float, end: float) -> None:
    pass


def forward_steps(stage: PipelineStage, inputs: torch.Tensor, labels: torch.Tensor | None, mtp_weight: float,
                  autocast: Callable[[], contextlib.AbstractContextManager],
                  record: Recorder = _no_record) -> Generator[None, None, SegmentedPass]:
    """Run the stage; yields while a dispatch or combine all-to-all is in flight. Returns the pass, whose
    ``output`` is the hidden state leaf (sent on) or the LossOutput on the last stage."""
    model, spec, rec = stage.model, stage.spec, SegmentedPass()
    cos, sin = model.rope(inputs.shape[1], inputs.device)

    @contextlib.contextmanager
    def compute():  # between yields: autocast, noting what autograd saves
        with autocast(), rec.recording():
            yield

    with compute():
        h = model.embed(inputs) if spec.is_first else inputs
    for layer in model.layers.values():
        moe = layer.mlp
        if not isinstance(moe, MoE):
            with compute():
                h = layer(h, cos, sin)
            continue
        with compute():
            h1, normed, again = layer.attention(h, cos, sin)
            flat, indices, weights, scores = moe.route(normed, again)
        h1, flat, weights, scores = rec.cut(h1, flat, weights, scores)
        d = moe.dispatcher
        if hasattr(d, "dispatch_start"):
            start = time.perf_counter()
            with rec.recording():
                handle = d.dispatch_start(flat, indices, weights, moe.num_experts)
            yield
            with rec.recording():
                rows, counts, state = handle.wait()
            record("dispatch", start, time.perf_counter())
        else:
            with rec.recording():
                rows, counts, state = d.dispatch(flat, indices, weights, moe.num_experts)
        rows, state.row_weights = rec.cut(rows, state.row_weights, comm=True)
        # The FP8 SwiGLU cache keeps the gate values as an attribute (moelib.model.recompute._Fp8GateUp), as the
        # plain layer does: 4 bytes per routed row.
        rec.hold(state.row_weights)
        with compute():
            y = moe.experts(rows, counts, state.row_weights)
        (y,) = rec.cut(y)
        if hasattr(d, "combine_start"):
            start = time.perf_counter()
            with rec.recording():
                handle = d.combine_start(y, state)
            yield
            with rec.recording():
                routed_out = handle.wait()
            record("combine", start, time.perf_counter())
        else:
            with rec.recording():
                routed_out = d.combine(y, state)
        (routed_out,) = rec.cut(routed_out, comm=True)
        with compute():
            h = h1 + moe.finish(flat, routed_out, indices, scores, counts, h1.shape, again)
    if not spec.is_last:
        (rec.output,) = rec.cut(h)
    else:
        with compute():
            rec.output = model.head_loss(h, labels, mtp_weight, cos, sin, embedding=stage.embedding)
    rec.free_unsaved()
    return rec


def backward_steps(rec: SegmentedPass, output_grad: torch.Tensor | None, loss_scale: float, defer_w: bool,
                   comm_executor: Executor | None = None, record: Recorder = _no_record) -> Generator[None, None, None]:
    """Backward through the recorded segments, last first. With ``comm_executor`` a communication
    segment's backward runs there and the generator yields until it is done, so the caller can compute
    meanwhile. Deferred weight grads (``defer_w``) are queued in the WeightGradStore as one group."""
    if isinstance(rec.output, LossOutput):
        last = Segment([rec.output.loss * loss_scale], [], False)
        grads_of = lambda seg: [None] if seg is last else [leaf.grad for leaf in seg.leaves]
        segments = rec.segments + [last]
    else:
        rec.output.grad = output_grad
        grads_of = lambda seg: [leaf.grad for leaf in seg.leaves]
        segments = rec.segments
    for seg in reversed(segments):
        pairs = [(o, g) for o, g in zip(seg.outputs, grads_of(seg)) if g is not None or o.dim() == 0]
        if not pairs:
            continue
        outputs, grads = zip(*pairs)
        grads = [g for g in grads] if any(g is not None for g in grads) else None
        if seg.comm and comm_executor is not None:
            start = time.perf_counter()
            future = comm_executor.submit(_timed_backward, outputs, grads)
            yield
            record("a2a-backward", start, future.result())
        else:
            with WeightGradStore.deferring(defer_w):
                torch.autograd.backward(outputs, grads)
        seg.outputs = seg.leaves = []  # free the activations as soon as their gradients are through
    if defer_w:
        WeightGradStore.end_group()


def _timed_backward(outputs, grads) -> float:
    torch.autograd.backward(outputs, grads)
    return time.perf_counter()


def drain(gen: Generator):
    """Run a step generator to the end without interleaving; returns its return value."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value
