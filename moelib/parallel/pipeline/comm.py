"""Point-to-point transfers between pipeline ranks.

Every message between two stages has a shape known in advance (micro-batch × sequence × hidden), so
no shapes travel. Each message carries a tag derived from (kind, micro-batch, chunk), so gloo matches
sends and receives by tag whatever order they are posted in; NCCL ignores tags, so with NCCL the
schedule's own posting order (the same on both ends) is what keeps messages apart.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ACTIVATION, GRADIENT = 0, 1


def tag(kind: int, microbatch: int, direction: int) -> int:
    return (microbatch * 2 + direction) * 2 + kind


class P2P:
    """Non-blocking sends (kept until the step ends) and receives posted when a recv is requested."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = shape, dtype, device
        self._sends: list[dist.Work] = []
        self.bytes_sent = 0

    def send(self, tensor: torch.Tensor, dst: int, kind: int, microbatch: int, direction: int) -> None:
        tensor = tensor.detach().to(self.dtype).contiguous()
        self._sends.append((dist.isend(tensor, dst, tag=tag(kind, microbatch, direction)), tensor))
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def recv_start(self, src: int, kind: int, microbatch: int, direction: int) -> tuple[torch.Tensor, dist.Work]:
        buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return buf, dist.irecv(buf, src, tag=tag(kind, microbatch, direction))

    def recv(self, src: int, kind: int, microbatch: int, direction: int) -> torch.Tensor:
        buf, work = self.recv_start(src, kind, microbatch, direction)
        work.wait()
        return buf

    def wait_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
