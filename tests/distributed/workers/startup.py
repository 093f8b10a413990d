"""Worker: join the job and build the mesh for the layout on the command line, then exit.

    startup.py PP EP SCHEDULE [MICROBATCHES]

A bad layout (or a missing MPI runtime) must end here, at start-up, with one line on rank 0 and a
non-zero exit on every rank.
"""

from __future__ import annotations

import sys

from _sync_common import main

from moelib.config import ModelConfig, ParallelConfig
from moelib.parallel.mesh import Mesh


def run(env) -> None:
    pp, ep, schedule = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    micro = int(sys.argv[4]) if len(sys.argv) > 4 else None
    mesh = Mesh(ParallelConfig(pp, ep, schedule, micro), ModelConfig.from_preset("tiny"))
    if env.rank == 0:
        print(f"mesh ok: {mesh.describe()}", flush=True)


if __name__ == "__main__":
    main(run)
