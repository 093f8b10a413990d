"""recipes/v3_pretrain.py: the evaluation flags' rules and --global-batch-size's derived micro-batches, checked
before any work starts (the mpirun side, one line on rank 0 and exit 2, is in tests/distributed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from moelib import ModelConfig, MoelibError
from moelib.config import ParallelConfig

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "v3_pretrain.py"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("v3_pretrain", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags, message", [
    (["--split", "1,2"], r"^--split 1,2: expected three non-negative weights"),
    (["--split", "1,-2,3"], r"^--split 1,-2,3: expected three non-negative weights"),
    (["--eval-only"], r"^--eval-only needs --load"),
    (["--eval-only", "--load", "x", "--eval-iters", "0"], r"^--eval-iters 0: must be a positive number of batches "
                                                          r"with --eval-only"),
    (["--eval-iters", "-1"], r"^--eval-iters -1: must be a positive number"),
    (["--eval-interval", "-3"], r"^--eval-interval -3: must be >= 0"),
])
def test_bad_evaluation_flags_name_the_flag(recipe, flags, message):
    with pytest.raises(MoelibError, match=message):
        recipe.check_eval_flags(recipe.parse_args(flags))


def test_good_evaluation_flags_pass(recipe):
    recipe.check_eval_flags(recipe.parse_args(["--split", "98,1,1", "--eval-interval", "0"]))
    recipe.check_eval_flags(recipe.parse_args(["--eval-only", "--load", "ckpt"]))


@pytest.mark.parametrize("world, pp, schedule, mbs, global_batch, microbatches", [
    (1, 1, "1f1b", 2, 16, 8),
    (4, 1, "1f1b", 2, 16, 2),       # DP 4
    (4, 2, "dualpipe", 1, 16, 8),   # DP 2
    (16, 2, "dualpipe", 1, 32, 4),  # DP 8
])
def test_global_batch_sets_micro_batches_per_data_parallel_rank(recipe, world, pp, schedule, mbs, global_batch,
                                                                microbatches):
    par = ParallelConfig(pipeline_model_parallel_size=pp, pipeline_schedule=schedule)
    out = recipe.layout_for_batch(par, global_batch, mbs, world, ModelConfig.from_preset("tiny"))
    assert out.num_microbatches == microbatches
    assert mbs * out.num_microbatches * (world // pp) == global_batch


def test_global_batch_that_does_not_divide_or_fit_the_pipeline_is_one_sentence(recipe):
    tiny, dual = ModelConfig.from_preset("tiny"), ParallelConfig(pipeline_model_parallel_size=2,
                                                                 pipeline_schedule="dualpipe")
    with pytest.raises(MoelibError, match=r"^--global-batch-size 6 must be a positive multiple of micro-batch size x "
                                          r"data-parallel size = 2 x 2$"):
        recipe.layout_for_batch(ParallelConfig(), 6, 2, 2, tiny)
    with pytest.raises(MoelibError, match=r"^--global-batch-size: a batch of 4 sequences gives 2 micro-batches per "
                                          r"data-parallel rank, which the pipeline rejects: .*"):
        recipe.layout_for_batch(dual, 4, 1, 4, tiny)


def test_sample_tokens_is_never_negative_and_leaves_room_for_a_prompt(recipe):
    with pytest.raises(MoelibError, match=r"^--sample-tokens must be 0 \(off\) or positive, got -1$"):
        recipe.parse_args(["--sample-tokens", "-1"])
    assert recipe.parse_args([]).sample_tokens == 64 and recipe.parse_args(["--sample-tokens", "0"]).sample_tokens == 0
    tiny = ModelConfig.from_preset("tiny")  # max_position_embeddings 1024
    recipe.check_sample_tokens(1023, tiny)
    with pytest.raises(MoelibError, match=r"^--sample-tokens 1024 leaves no room for a prompt in the model's "
                                          r"max_position_embeddings 1024$"):
        recipe.check_sample_tokens(1024, tiny)
