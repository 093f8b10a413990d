"""mpirun worker: rank 1 dies (``die``: exits abruptly) or stops answering (``stall``: sleeps) in the middle
of a run of all-reduces; the job must end with a non-zero code instead of hanging. mpirun tears the job
down when a rank exits non-zero; a silent rank is caught by the collective timeout (init(timeout_s=...)).

    rank_death.py die|stall TIMEOUT_S
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from moelib.parallel import launch

STALL_S = 6.0  # the silent rank gives up after this long; a prompt job never lets it


def main() -> None:
    mode, timeout_s = sys.argv[1], float(sys.argv[2])
    env = launch.init(backend="gloo", timeout_s=timeout_s)
    x = torch.ones(4)
    for step in range(1000):
        if step == 3 and env.rank == 1:
            if mode == "die":
                os._exit(7)
            time.sleep(STALL_S)
            print("silent rank woke up: the job outlived the failure", flush=True)
            return
        start = time.monotonic()
        try:
            dist.all_reduce(x)
        except RuntimeError:
            print(f"rank {env.rank}: collective failed after {time.monotonic() - start:.1f} s", flush=True)
            raise
        x.fill_(1.0)
    print("finished without noticing", flush=True)


if __name__ == "__main__":
    main()
