"""The planner's memory model: activation bytes extrapolated from shrunken proxies of the real layer match
the ``bench.py memory`` measurement of the layer itself; the table's rows follow the layout."""

from __future__ import annotations

import pytest

from moelib.config import ModelConfig, ParallelConfig
from moelib.parallel.pipeline.schedule import build_schedule
from moelib.plan.activations import layer_bytes_per_token, proxy, proxy_factors
from moelib.plan.memory import memory_table, state_bytes
from tools.benchmarks.memory import layer_bytes


@pytest.mark.parametrize("preset, backend, mode", [
    ("tiny", "bf16", "none"), ("tiny", "fp8-emulated", "selective"), ("small", "bf16", "selective"),
])
def test_extrapolated_activation_bytes_match_the_memory_bench_within_5_percent(preset, backend, mode):
    cfg = ModelConfig.from_preset(preset)
    predicted = layer_bytes_per_token(cfg, backend, mode, seq=128)
    for kind, index in (("dense", 0), ("moe", cfg.first_k_dense_replace)):
        measured = layer_bytes(cfg, backend, mode, index, 128, 1234)["held"]
        assert predicted[kind] == pytest.approx(measured, rel=0.05), (kind, predicted[kind], measured)


def test_proxies_shrink_only_the_widths():
    cfg = ModelConfig.from_preset("v3-671b")
    k1, k2 = proxy_factors(cfg)
    assert (k1, k2) == (32, 64)
    p = proxy(cfg, k2)
    assert (p.hidden_size, p.num_attention_heads, p.kv_lora_rank) == (112, 2, 8)
    assert (p.n_routed_experts, p.num_experts_per_tok, p.qk_rope_head_dim) == (256, 8, 64)


def test_expert_parallelism_and_zero_shrink_the_state_as_their_group_sizes_say():
    cfg = ModelConfig.from_preset("v3-671b")
    sched = build_schedule("dualpipe", 16, 32)
    ep64 = state_bytes(cfg, ParallelConfig(pipeline_model_parallel_size=16, expert_model_parallel_size=64,
                                           pipeline_schedule="dualpipe"), 2048, sched, 3, 4096)
    ep128 = state_bytes(cfg, ParallelConfig(pipeline_model_parallel_size=16, expert_model_parallel_size=128,
                                            pipeline_schedule="dualpipe"), 2048, sched, 3, 4096)
    assert ep128["master_weights"] < ep64["master_weights"]
    assert ep64["gradients"] == ep64["master_weights"]
    # every parameter of the model lives on some pipeline rank: the sum over ranks of one DP replica of
    # 1F1B's stages, expert shards times EP, is the whole model
    par = ParallelConfig(pipeline_model_parallel_size=4, expert_model_parallel_size=1)
    one = build_schedule("1f1b", 4, 1)
    total = sum(state_bytes(cfg, par, 4, one, r, 4096)["ema_host"] for r in range(4)) // 4
    counts = cfg.param_counts()
    assert total == counts["total"] + counts["mtp"] + counts["embedding"]  # the last stage keeps its own embedding


def test_dualpipe_holds_two_stages_and_one_more_microbatch_of_activations():
    cfg = ModelConfig.from_preset("tiny")
    per_token = {"dense": 1000.0, "moe": 2000.0}
    dp_par = ParallelConfig(pipeline_model_parallel_size=2, expert_model_parallel_size=2, pipeline_schedule="dualpipe")
    dual = memory_table(cfg, dp_par, 4, build_schedule("dualpipe", 2, 4), per_token, 64)
    assert dual.activation_microbatches == 3  # PP + 1
    # stage 0 = layers 0-2 (dense, MoE, MoE), stage 1 = layer 3 and MTP. Rank 0 peaks after F0 F2 F1: two
    # micro-batches on stage 0, one on stage 1 (rank 1 the other way round, less); both hold every weight
    stage0, stage1 = 64 * (1000.0 + 2 * 2000.0), 64 * 2 * 2000.0
    assert dual.rank == 0 and dual.rows["activations"] == 2 * stage0 + stage1
    one_par = ParallelConfig(pipeline_model_parallel_size=2, expert_model_parallel_size=2, num_microbatches=4)
    one = memory_table(cfg, one_par, 4, build_schedule("1f1b", 2, 4), per_token, 64)
    # the last rank needs the most (head, MTP): 1F1B holds PP - r = 1 micro-batch there, of layer 3 and MTP
    assert (one.rank, one.activation_microbatches) == (1, 1)
    assert one.rows["activations"] == 64 * 2 * 2000.0
    assert dual.rows["master_weights"] > one.rows["master_weights"]
