"""mpirun worker: rank 1 fails (``bug``: a ValueError; ``error``: a moelib error) while the others wait in an
all-reduce for it; run through moelib.parallel.report.run_main, as the recipe is.

    failing_rank.py bug|error
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from moelib.errors import DataError
from moelib.parallel import launch, report


def main() -> int:
    env = launch.init(backend="gloo", timeout_s=120)
    dist.barrier()
    if env.rank == 1:
        if sys.argv[1] == "bug":
            return [][1]  # a bug: IndexError
        raise DataError("shard 7 of the corpus is truncated")
    dist.all_reduce(torch.ones(1))
    return 0


if __name__ == "__main__":
    sys.exit(report.run_main(main, "failing_rank"))
