"""The planner's step time: FLOPs split by stage add up to the model's, the all-to-all volume follows
node-limited routing, and the simulator's bubble with the plan's chunk times is the published one."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.config import ModelConfig, ParallelConfig
from moelib.errors import ConfigError
from moelib.parallel.pipeline.schedule import build_schedule
from moelib.parallel.pipeline.simulate import published_bubble, simulate
from moelib.parallel.pipeline.stage import split_layers
from moelib.plan.hardware import hardware
from moelib.plan.memory import state_bytes
from moelib.plan.planner import PlanInputs, chunk_times, make_plan
from moelib.plan.timing import ChunkTime, all_to_all, stage_costs, stage_flops, step_time
from moelib.train.metrics import model_flops_per_token

V3 = ModelConfig.from_preset("v3-671b")
FLAT = {"dense": 1000.0, "moe": 2000.0}  # activation bytes per token: not under test here


@pytest.mark.parametrize("preset, stages", [("v3-671b", 16), ("v2-lite-16b", 4), ("tiny", 2)])
def test_stage_flops_add_up_to_the_models_training_flops(preset, stages):
    cfg = ModelConfig.from_preset(preset)
    total = sum(sum(stage_flops(cfg, spec, 4096)) for spec in split_layers(cfg, stages, 4096))
    assert 3 * total == pytest.approx(model_flops_per_token(cfg, 4096), rel=1e-12)


@pytest.mark.parametrize("name, pp, m", [("1f1b", 8, 16), ("zb1p", 8, 16), ("dualpipe", 8, 16), ("dualpipe", 16, 120)])
def test_simulated_bubble_equals_table_2_for_the_plans_chunk_times(name, pp, m):
    inputs = PlanInputs(V3, hardware("h800"), 2048, 16, 64)
    slow = max(chunk_times(inputs, split_layers(V3, 16, 4096))[0], key=lambda c: c.Fc)
    chunk = ChunkTime(slow.Fc, slow.Bc, slow.Wc, 0.0, 0.0)  # Table 2 counts compute alone
    s = build_schedule(name, pp, m)
    costs = stage_costs(s, [chunk] * s.num_stages)
    assert simulate(s, costs).bubble == pytest.approx(published_bubble(s, costs), rel=1e-9)


@settings(max_examples=15, deadline=None)
@given(efficiency=st.floats(0.05, 1.0), seq=st.sampled_from([1024, 4096, 16384]), gpu=st.sampled_from(["h800", "b200"]),
       name=st.sampled_from(["1f1b", "zb1p", "dualpipe"]), pp=st.sampled_from([4, 6, 8]), extra=st.integers(0, 6))
def test_table_2_holds_for_any_efficiency_sequence_and_gpu(efficiency, seq, gpu, name, pp, extra):
    inputs = PlanInputs(V3, hardware(gpu), 2048, 16, 64, seq_length=seq, efficiency=efficiency)
    chunks = chunk_times(inputs, split_layers(V3, 16, 4096))[0]
    slow = max(chunks, key=lambda c: c.Fc)
    s = build_schedule(name, pp, 2 * pp + 2 * extra)
    costs = stage_costs(s, [ChunkTime(slow.Fc, slow.Bc, slow.Wc, 0.0, 0.0)] * s.num_stages)
    assert simulate(s, costs).bubble == pytest.approx(published_bubble(s, costs), rel=1e-9)


def test_dualpipe_hides_the_all_to_all_that_1f1b_exposes():
    chunks = [ChunkTime(1.0, 2.0, 1.0, 1.0, 1.5)] * 4  # each half's comm fits under the other's compute
    one = step_time(build_schedule("1f1b", 4, 16), chunks)
    dual16 = step_time(build_schedule("dualpipe", 4, 16), chunks)
    dual64 = step_time(build_schedule("dualpipe", 4, 64), chunks)
    # 1F1B waits for every all-to-all; DualPipe only in its warm-up and drain, a shrinking share
    assert one.exposed_comm_fraction > 0.35
    assert one.exposed_comm_fraction > dual16.exposed_comm_fraction > dual64.exposed_comm_fraction > 0
    assert step_time(build_schedule("dualpipe", 4, 16), [ChunkTime(1.0, 2.0, 1.0, 0.0, 0.0)] * 4) \
        .exposed_comm_fraction == 0
    swamped = step_time(build_schedule("dualpipe", 4, 16), [ChunkTime(1.0, 2.0, 1.0, 6.0, 6.0)] * 4)
    assert swamped.exposed_comm_fraction > 0.5 and swamped.step_time_s > dual16.step_time_s


def test_all_to_all_follows_node_limited_routing_and_fp8_dispatch():
    hw = hardware("h800")
    one_node = all_to_all(V3, hw, 8, 4096, True, 4)
    assert one_node.network_share == 0  # EP inside a node: NVLink only
    m4 = all_to_all(V3, hw, 64, 4096, True, 4)
    unlimited = all_to_all(V3, hw, 64, 4096, True, None)
    assert m4.forward < unlimited.forward  # at most 4 of 8 nodes per token, not up to 8
    # the network carries M (N-1)/N = 3.5 copies of each token: E4M3 + scales out, bf16 back
    assert m4.dispatch == pytest.approx(4096 * 3.5 * 7168 * (1 + 4 / 128) / 50e9)
    assert m4.combine == pytest.approx(4096 * 3.5 * 7168 * 2 / 50e9)
    assert all_to_all(V3, hw, 64, 4096, False, 4).dispatch == pytest.approx(m4.combine)


def test_v3_step_time_scales_with_efficiency_and_gpu_hours_with_tokens():
    base = PlanInputs(V3, hardware("h800"), 2048, 16, 64, tokens=1e12)
    slow, fast = make_plan(base, FLAT), make_plan(dataclasses.replace(base, efficiency=0.8), FLAT)
    assert fast.time.step_time_s < slow.time.step_time_s
    assert fast.mfu > slow.mfu
    more = make_plan(dataclasses.replace(base, tokens=2e12), FLAT)
    assert more.gpu_hours == pytest.approx(2 * slow.gpu_hours)
    assert slow.gpu_hours == pytest.approx(2048 * slow.step_time_s * 1e12 / (15360 * 4096) / 3600)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["1f1b", "zb1p", "dualpipe", "dualpipev"]), pp=st.sampled_from([2, 4, 6]),
       extra=st.integers(0, 3), data=st.data())
def test_replayed_step_equals_the_event_simulator(name, pp, extra, data):
    s = build_schedule(name, pp, 2 * pp + 2 * extra)
    time = st.floats(0.01, 3.0)
    chunks = [ChunkTime(f, f + i, w * f, cf, cb) for f, i, w, cf, cb in
              data.draw(st.lists(st.tuples(time, time, st.floats(0.0, 1.0), time, time),
                                 min_size=s.num_stages, max_size=s.num_stages))]
    costs = stage_costs(s, chunks)
    sim = simulate(s, costs)
    fast = step_time(s, chunks)
    assert fast.step_time_s == pytest.approx(float(sim.makespan), rel=1e-12)
    assert fast.busy_s == pytest.approx([float(b) for b in sim.busy], rel=1e-12)
    assert fast.bubble_fraction == pytest.approx(sim.bubble_fraction, rel=1e-9, abs=1e-12)


def test_compute_runs_on_the_sms_the_all_to_all_leaves():
    base = PlanInputs(V3, hardware("h800"), 2048, 16, 64, efficiency=0.5)
    specs = split_layers(V3, 16, 4096)
    with_ep = chunk_times(base, specs)[0]
    no_ep = chunk_times(dataclasses.replace(base, ep=1), specs)[0]
    for a, b in zip(with_ep, no_ep):
        assert a.Fc == pytest.approx(b.Fc * 132 / 112)  # 20 of 132 SMs serve DeepEP
    none_kept = chunk_times(dataclasses.replace(base, hw=hardware("h800", comm_sms=0)), specs)[0]
    assert [c.Fc for c in none_kept] == pytest.approx([c.Fc for c in no_ep])
    with pytest.raises(ConfigError, match="^--comm-sms: 132 leaves none"):
        hardware("h800", comm_sms=132)


def test_compute_to_comm_is_one_at_the_efficiency_the_plan_names():
    plan = make_plan(PlanInputs(V3, hardware("h800"), 2048, 16, 64, efficiency=0.3), FLAT)
    middle = plan.chunks[5]  # four MoE layers: the chunk where communication weighs most
    assert plan.compute_to_comm == pytest.approx(middle.Fc / middle.Cf)
    at = make_plan(dataclasses.replace(plan.inputs, efficiency=plan.one_to_one_efficiency), FLAT)
    assert at.compute_to_comm == pytest.approx(1.0)


def test_step_end_moves_the_ranks_fp32_state_over_its_groups():
    # PP 2 x DP 4, no EP and no MTP: every parameter is dense, the ZeRO all-gather sends 3/4 of the rank's
    # fp32 weights over NVLink (the 4 DP ranks share a node), the all-reduce twice that
    cfg = ModelConfig.from_preset("tiny", num_nextn_predict_layers=0)
    hw = hardware("h100")
    i = PlanInputs(cfg, hw, 8, 2, 1, schedule="1f1b", global_batch_size=16, seq_length=64)
    plan = make_plan(i, FLAT)
    schedule = build_schedule("1f1b", 2, 4)
    par = ParallelConfig(pipeline_model_parallel_size=2)
    weights = [state_bytes(cfg, par, 8, schedule, r, 64)["ema_host"] for r in range(2)]  # fp32, one copy each
    assert plan.update.param_gather == pytest.approx(0.75 * max(weights) / (hw.nvlink_gbps * 1e9))
    assert plan.update.gradient_sync == pytest.approx(2 * plan.update.param_gather)
    assert plan.step_time_s == pytest.approx(plan.time.step_time_s + plan.update.total)
    # across nodes the same bytes go at the network's rate; one DP rank sends nothing
    wide = make_plan(dataclasses.replace(i, hw=hardware("h100", gpus_per_node=2)), FLAT)
    assert wide.update.param_gather == pytest.approx(plan.update.param_gather * hw.nvlink_gbps / hw.network_gbps)
    alone = make_plan(dataclasses.replace(i, gpus=2, global_batch_size=4), FLAT)
    assert alone.update.gradient_sync == alone.update.param_gather == 0 < alone.update.optimizer


def test_dualpipe_sums_its_mirror_copies_before_the_data_parallel_reduction():
    i = PlanInputs(V3, hardware("h800"), 2048, 16, 64, efficiency=0.3)
    dual = make_plan(i, FLAT).update
    weights = state_bytes(V3, ParallelConfig(pipeline_model_parallel_size=16, expert_model_parallel_size=64),
                          2048, build_schedule("dualpipe", 16, 120), 0, 4096)["ema_host"]
    # the pair's all-reduce moves the rank's fp32 weights once over the network, on top of the DP reduction
    assert dual.gradient_sync > weights / 50e9 + 2 * dual.param_gather * 0.99


@pytest.mark.parametrize("preset", ["v3-671b", "v2-lite-16b", "tiny"])
def test_block_flops_are_six_times_the_activated_parameters_plus_the_attention_core(preset):
    cfg = ModelConfig.from_preset(preset)
    c = cfg.param_counts()
    core = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * 4096 * (cfg.qk_head_dim + cfg.v_head_dim) / 2
    assert model_flops_per_token(cfg, 4096, with_mtp=False) == pytest.approx(6 * (c["activated"] - c["embedding"])
                                                                             + core, rel=1e-12)
