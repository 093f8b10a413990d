"""DualPipe's F&B: the forward of one micro-batch interleaved with the backward of another.

Both passes run as generators over the segments of ``segments.py`` and hand over at every all-to-all:
the forward posts its dispatch (or combine) and yields, and the backward computes meanwhile; the
backward hands its all-to-all to the communication thread and yields, and the forward computes
meanwhile. So at attention / dispatch / experts / combine granularity one side's all-to-all is in flight
while the other side computes, as in DeepSeek-V3's overlapped chunks. Forward all-to-alls are posted
asynchronously on the EP group; backward ones run on a second group of the same ranks (the order of
collectives within each group is then the same on every rank).
"""

from __future__ import annotations

from concurrent.futures import Executor

from moelib.parallel.pipeline.schedule import Op


def overlapped_forward_backward(runtime, op: Op, comm_executor: Executor | None) -> None:
    sides = [runtime.forward_steps(op.mb, op.chunk),
             runtime.backward_steps(op.b_mb, op.b_chunk, op.defer_w, comm_executor)]
    while sides:
        for side in list(sides):
            try:
                next(side)  # runs until this side has an all-to-all in flight (or is done)
            except StopIteration:
                sides.remove(side)
