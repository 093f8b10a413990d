"""The planner's weight, gradient, optimizer and EMA bytes equal what a real ParallelTrainer allocates."""

from __future__ import annotations

import json

import pytest
from _mpi import run_mpi

from moelib.config import ModelConfig, ParallelConfig
from moelib.parallel.pipeline.schedule import build_schedule
from moelib.plan.memory import state_bytes

pytestmark = pytest.mark.dist


def test_planned_state_bytes_equal_a_real_runs_tensors():
    rc, out, err = run_mpi(4, "plan_state_bytes.py", "tiny:2:2:dualpipe,tiny:2:2:1f1b,small/narrow:2:2:dualpipe",
                           timeout=400)
    assert rc == 0, f"mpirun exited {rc}\n{out[-3000:]}\n{err[-3000:]}"
    results = [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 3 * 4
    for r in results:
        pp, ep, schedule = r["layout"].split(":")
        par = ParallelConfig(pipeline_model_parallel_size=int(pp), expert_model_parallel_size=int(ep),
                             pipeline_schedule=schedule)
        plan = state_bytes(ModelConfig.from_dict(r["model"]), par, r["world"],
                           build_schedule(schedule, par.pp, par.microbatches), r["pp_rank"], r["seq_length"],
                           moment_bytes=2 if r["moment_dtype"] == "bf16" else 4)
        for row in ("master_weights", "gradients", "optimizer", "ema_host"):
            assert plan[row] == r[row], (r["model"], r["layout"], r["pp_rank"], row, plan[row], r[row])
