"""--search: fitting layouts for V2-Lite on 8 H100 and V3 on 2048 H800, with V3's own among the fastest."""

from __future__ import annotations

import pytest

from moelib.config import ModelConfig
from moelib.plan.hardware import hardware
from moelib.plan.planner import PlanInputs, plan_memory, search


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOELIB_CACHE_DIR", str(tmp_path))  # measure here, not into the user's cache


def test_v2_lite_on_8_h100_finds_fitting_layouts_and_says_why_the_rest_do_not():
    inputs = PlanInputs(ModelConfig.from_preset("v2-lite-16b"), hardware("h100"), 8, 1, 1, global_batch_size=64,
                        activation_seq=32)
    found = search(inputs)
    fitting = [c for c in found if c.reason is None]
    assert fitting and all(c.plan.fits for c in fitting)
    times = [c.plan.step_time_s for c in fitting]
    assert times == sorted(times)
    rejected = [c for c in found if c.reason is not None]
    assert rejected and all(c.plan is None for c in rejected)
    assert any("GiB per GPU, over the" in c.reason for c in rejected)  # EP 1 holds all 64 experts per GPU


def test_v3_search_on_2048_h800_ranks_v3s_own_layout_among_the_fastest():
    # full recompute, measured quickly (the layer input it keeps is the same per token at any length: seq 32);
    # V3's own layout under selective recompute: the next test

    inputs = PlanInputs(ModelConfig.from_preset("v3-671b"), hardware("h800"), 2048, 1, 1, recompute="full",
                        activation_seq=32)
    fitting = [c for c in search(inputs) if c.reason is None]
    layouts = [(c.inputs.pp, c.inputs.ep, c.inputs.schedule) for c in fitting]
    assert len(fitting) >= 10
    assert (16, 64, "dualpipe") in layouts[:3], layouts[:5]


def test_v3s_own_layout_fits_80_gb_under_selective_recompute():
    """PP16 x EP64 DualPipe, fp8, 4096 tokens, with V3's selective recompute: every row of the fullest rank's
    table, activations measured on the real layer's proxies, within 90 % of the H800's 80 GB."""
    hw = hardware("h800")
    inputs = PlanInputs(ModelConfig.from_preset("v3-671b"), hw, 2048, 16, 64)
    table = plan_memory(inputs)
    assert table.total <= inputs.usable_memory * hw.hbm_bytes, table.rows
    assert table.rows["activations"] > 0
