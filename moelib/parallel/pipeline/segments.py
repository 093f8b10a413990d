"""A stage's forward recorded as autograd segments cut at the expert all-to-alls.

Each MoE layer runs as: [attention + router] | dispatch all-to-all | [experts] | combine all-to-all |
[shared experts + residual ...]. Every cut replaces a tensor by a detached leaf, so the backward can run
one segment at a time, in reverse: ``torch.autograd.backward(segment outputs, grads of their leaves)``
fills the grads of the earlier leaves it reaches. That is what lets the overlapped schedule run a
communication segment (forward or backward) while the other micro-batch computes.

Both passes are generators that ``yield`` while an all-to-all is in flight; drained without
interleaving, they are an ordinary forward and backward (and give the same numbers as the plain model).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

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
    with autocast():
        h = model.embed(inputs) if spec.is_first else inputs
    for layer in model.layers.values():
        moe = layer.mlp
        if not isinstance(moe, MoE):
            with autocast():
                h = layer(h, cos, sin)
            continue
        with autocast():
            h1 = layer.attention(h, cos, sin)
            normed, again = layer.post_attention_layernorm.forward_again(h1)
            flat, indices, weights, scores = moe.route(normed, again)
        h1, flat, weights, scores = rec.cut(h1, flat, weights, scores)
        d = moe.dispatcher
        if hasattr(d, "dispatch_start"):
            start = time.perf_counter()
            handle = d.dispatch_start(flat, indices, weights, moe.num_experts)
            yield
            rows, counts, state = handle.wait()
            record("dispatch", start, time.perf_counter())
        else:
            rows, counts, state = d.dispatch(flat, indices, weights, moe.num_experts)
        rows, state.row_weights = rec.cut(rows, state.row_weights, comm=True)
        with autocast():
            y = moe.experts(rows, counts, state.row_weights)
        (y,) = rec.cut(y)
        if hasattr(d, "combine_start"):
            start = time.perf_counter()
            handle = d.combine_start(y, state)
            yield
            routed_out = handle.wait()
            record("combine", start, time.perf_counter())
        else:
            routed_out = d.combine(y, state)
        (routed_out,) = rec.cut(routed_out, comm=True)
        with autocast():
            h = h1 + moe.finish(flat, routed_out, indices, scores, counts, h1.shape, again)
    if not spec.is_last:
        (rec.output,) = rec.cut(h)
        return rec
    with autocast():
        rec.output = model.head_loss(h, labels, mtp_weight, cos, sin, embedding=stage.embedding)
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
