"""recipes/v3_pretrain.py::check_batch_sizes: every batch a --rampup-batch-size ramp produces is checked against
the pipeline's micro-batch rules (owned by ParallelConfig.validate) before any work starts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from moelib import MoelibError
from moelib.config import ParallelConfig
from moelib.train.schedules import ScheduleConfig

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "v3_pretrain.py"


@pytest.fixture(scope="module")
def check_batch_sizes():
    spec = importlib.util.spec_from_file_location("v3_pretrain", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check_batch_sizes


def ramp(start: int, increment: int, end: int) -> ScheduleConfig:
    return ScheduleConfig.for_budget(10_000_000, 1e-3, 1e-4, 0, seq_length=128, batch_end=end, batch_start=start,
                                     batch_granularity=increment)


def dualpipe(pp: int = 2) -> ParallelConfig:
    return ParallelConfig(pipeline_model_parallel_size=pp, pipeline_schedule="dualpipe")


def test_valid_ramp_passes(check_batch_sizes):
    check_batch_sizes(ramp(8, 4, 16), 1, dualpipe(), dp=2)  # 4, 6, 8 micro-batches: even and >= 4
    check_batch_sizes(ramp(2, 2, 8), 1, ParallelConfig(), dp=2)  # 1F1B takes any count


def test_increment_must_split_into_micro_batches(check_batch_sizes):
    with pytest.raises(MoelibError, match=r"^--rampup-batch-size INCREMENT 2 must be a multiple of 4 \(micro-batch "
                                          r"size 2 x data-parallel size 2\)$"):
        check_batch_sizes(ramp(6, 2, 16), 2, dualpipe(), dp=2)


def test_every_batch_of_the_ramp_meets_the_schedule_rule(check_batch_sizes):
    # START and INCREMENT split evenly, but 10 sequences on DP 2 give 5 micro-batches: DualPipe needs an even count.
    with pytest.raises(MoelibError, match="a batch of 10 sequences gives 5 micro-batches per data-parallel rank.*"
                                          "DualPipe needs an even number of micro-batches"):
        check_batch_sizes(ramp(8, 2, 12), 1, dualpipe(), dp=2)
    with pytest.raises(MoelibError, match="a batch of 12 sequences gives 6 micro-batches.*at least 2 x pipeline "
                                          "size = 8"):
        check_batch_sizes(ramp(12, 4, 20), 1, dualpipe(pp=4), dp=2)


def test_no_ramp_is_left_to_the_global_batch_check(check_batch_sizes):
    check_batch_sizes(ramp(6, 1, 6), 1, dualpipe(), dp=2)
