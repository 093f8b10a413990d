"""Token-driven schedules (LR, batch size, MTP weight λ, bias speed γ) match their definitions at every
boundary, keep their monotonicity for any valid config, reproduce V3's published numbers, and resume from
their JSON state."""

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib import TrainConfig
from moelib.errors import ConfigError
from moelib.train.schedules import (
    V3_WARMUP_STEPS,
    ScheduleConfig,
    Schedules,
    batch_size_at,
    bias_speed_at,
    lr_at_tokens,
    mtp_weight_at,
    tokens_for_steps,
)

B, T = 10**9, 10**12


@pytest.fixture
def cfg():
    """Round numbers, so every boundary is easy to state."""
    return ScheduleConfig(
        seq_length=4, lr=1e-3, min_lr=1e-4, lr_warmup_tokens=100, lr_constant_until_tokens=400,
        lr_decay_tokens=200, lr_tails=[(700, 5e-5), (800, 1e-5)],
        batch_start=4, batch_end=16, batch_ramp_tokens=120, batch_granularity=4,
        mtp_weight=0.3, mtp_weight_after=0.1, mtp_switch_tokens=500,
        bias_update_speed=1e-3, bias_freeze_tokens=900,
    )


def test_lr_boundaries(cfg):
    lr = lambda t: lr_at_tokens(t, cfg)
    assert lr(0) == 0.0
    assert lr(50) == pytest.approx(5e-4, rel=1e-12)
    assert lr(99) == pytest.approx(9.9e-4, rel=1e-12)
    assert lr(100) == 1e-3                                   # warm-up ends at the peak
    assert lr(399) == 1e-3                                   # constant
    assert lr(400) == 1e-3                                   # cosine starts at the peak
    assert lr(401) == pytest.approx(1e-3, rel=1e-4)          # ... continuously
    assert lr(500) == pytest.approx(5.5e-4, rel=1e-12)       # half way: the mean of peak and min_lr
    assert lr(599) == pytest.approx(1e-4, rel=1e-3)          # continuous into min_lr ...
    assert lr(599) > 1e-4
    assert lr(600) == 1e-4                                   # ... which the cosine ends on exactly
    assert lr(699) == 1e-4
    assert lr(700) == 5e-5                                   # first tail
    assert lr(799) == 5e-5
    assert lr(800) == 1e-5                                   # last tail, to the end
    assert lr(10**9) == 1e-5


def test_batch_boundaries(cfg):
    batch = lambda t: batch_size_at(t, cfg)
    # 4 + 12·t/120, rounded down to a multiple of 4.
    assert [batch(t) for t in (0, 39, 40, 79, 80, 119, 120, 10**6)] == [4, 4, 8, 8, 12, 12, 16, 16]


def test_switches(cfg):
    assert mtp_weight_at(0, cfg) == 0.3
    assert mtp_weight_at(499, cfg) == 0.3
    assert mtp_weight_at(500, cfg) == 0.1
    assert bias_speed_at(0, cfg) == 1e-3
    assert bias_speed_at(899, cfg) == 1e-3
    assert bias_speed_at(900, cfg) == 0.0


def test_no_warmup_no_decay_no_ramp():
    cfg = ScheduleConfig(seq_length=1, lr=1.0, min_lr=0.5, lr_warmup_tokens=0, lr_constant_until_tokens=10,
                         lr_decay_tokens=0, lr_tails=[], batch_start=2, batch_end=2, batch_ramp_tokens=0)
    assert [lr_at_tokens(t, cfg) for t in (0, 9, 10, 99)] == [1.0, 1.0, 0.5, 0.5]
    assert batch_size_at(0, cfg) == batch_size_at(10**6, cfg) == 2


def test_negative_tokens_raise(cfg):
    with pytest.raises(ValueError, match="tokens"):
        lr_at_tokens(-1, cfg)


# -- DeepSeek-V3 ----------------------------------------------------------------------------------------------

def test_v3_reproduces_the_published_numbers():
    cfg = ScheduleConfig.v3()
    assert cfg == ScheduleConfig()                            # the defaults are V3
    lr = lambda t: lr_at_tokens(t, cfg)
    assert lr(cfg.lr_warmup_tokens) == 2.2e-4
    assert lr(10 * T) == 2.2e-4                               # constant to 10T
    assert lr(12_150 * B) == pytest.approx((2.2e-4 + 2.2e-5) / 2, rel=1e-12)
    assert lr(14_300 * B - 1) == pytest.approx(2.2e-5, rel=1e-9)
    assert lr(14_300 * B) == 2.2e-5                           # cosine to 2.2e-5 over 4.3T
    assert lr(14_633 * B - 1) == 2.2e-5                       # then 2.2e-5 for 333B tokens
    assert lr(14_633 * B) == 7.3e-6                           # and 7.3e-6 for the last 167B
    assert lr(14_800 * B) == 7.3e-6
    assert batch_size_at(0, cfg) == 3072
    assert batch_size_at(469 * B - 1, cfg) == 15359
    assert batch_size_at(469 * B, cfg) == 15360
    assert batch_size_at(14 * T, cfg) == 15360
    assert mtp_weight_at(10 * T - 1, cfg) == 0.3 and mtp_weight_at(10 * T, cfg) == 0.1
    assert bias_speed_at(14_300 * B - 1, cfg) == 0.001 and bias_speed_at(14_300 * B, cfg) == 0.0
    assert cfg.seq_length == 4096


def test_v3_warms_up_over_2000_steps():
    """Warm-up is given in tokens: V3's 2000 steps under its batch ramp. Step 2000 reaches the peak."""
    cfg = ScheduleConfig.v3()
    assert cfg.lr_warmup_tokens == tokens_for_steps(V3_WARMUP_STEPS, cfg)
    sched = Schedules(cfg)
    steps = [sched.step() for _ in range(V3_WARMUP_STEPS)]
    assert steps[0].batch_size == 3072 and steps[0].tokens == 3072 * 4096
    assert 0 < steps[0].lr < steps[-2].lr < 2.2e-4
    assert steps[-1].lr == 2.2e-4 and steps[-1].tokens == cfg.lr_warmup_tokens
    # Overriding the ramp moves the warm-up with it.
    flat = ScheduleConfig.v3(batch_ramp_tokens=0)
    assert flat.lr_warmup_tokens == V3_WARMUP_STEPS * 15360 * 4096


def test_for_budget_keeps_v3_proportions():
    total = 1_000_000
    cfg = ScheduleConfig.for_budget(total, 3e-3, 3e-4, 1000, seq_length=128, batch_start=8, batch_end=32,
                                    batch_granularity=8)
    assert cfg.mtp_switch_tokens == cfg.lr_constant_until_tokens == 675_675  # 10T/14.8T ≈ 2/3
    assert cfg.bias_freeze_tokens == cfg.cosine_end_tokens == 966_216       # γ = 0 for the last ~3%
    assert 0.03 < 1 - cfg.bias_freeze_tokens / total < 0.035
    assert cfg.lr_tails == [(966_216, 3e-4), (988_716, pytest.approx(3e-4 * 7.3e-6 / 2.2e-5, rel=1e-12))]
    assert cfg.batch_ramp_tokens == 31_689
    assert lr_at_tokens(1000, cfg) == 3e-3 and lr_at_tokens(966_216, cfg) == 3e-4
    by_steps = ScheduleConfig.for_budget(total, 3e-3, 3e-4, warmup_steps=5, seq_length=128, batch_end=8)
    assert by_steps.lr_warmup_tokens == 5 * 8 * 128 and by_steps.batch_start == 8
    with pytest.raises(ConfigError, match="warmup_tokens"):
        ScheduleConfig.for_budget(total, 3e-3, 3e-4, seq_length=128, batch_end=8)
    with pytest.raises(ConfigError, match="lr_warmup_tokens"):
        ScheduleConfig.for_budget(total, 3e-3, 3e-4, 700_000, seq_length=128, batch_end=8)


# -- monotonicity over random configs ---------------------------------------------------------------------

@st.composite
def configs(draw):
    warmup = draw(st.integers(0, 10**6))
    constant_until = warmup + draw(st.integers(0, 10**6))
    decay = draw(st.integers(0, 10**6))
    lr = draw(st.floats(1e-6, 1.0))
    min_lr = lr * draw(st.floats(0.0, 1.0))
    tails, start, tail_lr = [], constant_until + decay, min_lr
    for _ in range(draw(st.integers(0, 3))):
        start += draw(st.integers(1, 10**6))
        tail_lr *= draw(st.floats(0.0, 1.0))
        tails.append((start, tail_lr))
    granularity = draw(st.integers(1, 64))
    batch_start = granularity * draw(st.integers(1, 100))
    batch_end = batch_start + granularity * draw(st.integers(0, 1000))
    return ScheduleConfig(
        seq_length=draw(st.integers(1, 4096)), lr=lr, min_lr=min_lr, lr_warmup_tokens=warmup,
        lr_constant_until_tokens=constant_until, lr_decay_tokens=decay, lr_tails=tails,
        batch_start=batch_start, batch_end=batch_end, batch_ramp_tokens=draw(st.integers(0, 10**7)),
        batch_granularity=granularity,
    )


def _probe_points(cfg, extra):
    edges = [cfg.lr_warmup_tokens, cfg.lr_constant_until_tokens, cfg.cosine_end_tokens, cfg.batch_ramp_tokens,
             *(start for start, _ in cfg.lr_tails)]
    return sorted({max(0, e + d) for e in edges for d in (-1, 0, 1)} | set(extra) | {0})


@settings(max_examples=150, deadline=None)
@given(configs(), st.lists(st.integers(0, 2 * 10**7), max_size=30))
def test_monotonic(cfg, extra):
    points = _probe_points(cfg, extra)
    lrs = [lr_at_tokens(t, cfg) for t in points]
    warmup = [lr for t, lr in zip(points, lrs) if t < cfg.lr_warmup_tokens]
    after = [lr for t, lr in zip(points, lrs) if t >= cfg.lr_warmup_tokens]
    if cfg.lr_warmup_tokens < cfg.cosine_end_tokens:  # else constant and cosine are empty: a step to min_lr
        assert lr_at_tokens(cfg.lr_warmup_tokens, cfg) == cfg.lr
    assert all(a <= b for a, b in zip(warmup, warmup[1:]))
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert all(0 <= lr <= cfg.lr for lr in lrs)
    batches = [batch_size_at(t, cfg) for t in points]
    assert all(a <= b for a, b in zip(batches, batches[1:]))
    assert all(b % cfg.batch_granularity == 0 and cfg.batch_start <= b <= cfg.batch_end for b in batches)
    assert batch_size_at(cfg.batch_ramp_tokens, cfg) == cfg.batch_end
    assert cfg.batch_ramp_tokens == 0 or batches[0] == cfg.batch_start  # no ramp: batch_end from the start


# -- state and serialisation --------------------------------------------------------------------------------

def test_state_round_trips_through_json(cfg):
    straight = Schedules(cfg)
    first = [straight.step() for _ in range(7)]
    saved = json.dumps({"schedule": straight.state_dict()})
    resumed = Schedules(cfg, json.loads(saved)["schedule"])
    assert resumed.state == straight.state
    assert straight.state.consumed_samples == sum(s.batch_size for s in first)
    assert straight.state.consumed_tokens == straight.state.consumed_samples * cfg.seq_length
    assert [straight.step() for _ in range(20)] == [resumed.step() for _ in range(20)]


def test_config_round_trips_through_json(cfg):
    for c in (cfg, ScheduleConfig.v3()):
        assert ScheduleConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("overrides, field", [
    (dict(lr=0.0), "ScheduleConfig.lr:"),
    (dict(min_lr=2e-3), "ScheduleConfig.min_lr:"),
    (dict(lr=float("nan")), "ScheduleConfig.lr:"),
    (dict(lr_warmup_tokens=401), "ScheduleConfig.lr_warmup_tokens:"),
    (dict(lr_decay_tokens=1.5), "ScheduleConfig.lr_decay_tokens:"),
    (dict(lr_constant_until_tokens=-1), "ScheduleConfig.lr_constant_until_tokens:"),
    (dict(lr_tails=[(599, 5e-5)]), r"ScheduleConfig.lr_tails\[0\]:"),
    (dict(lr_tails=[(700, 5e-5), (700, 1e-5)]), r"ScheduleConfig.lr_tails\[1\]:"),
    (dict(lr_tails=[(700, 5e-5), (800, 6e-5)]), r"ScheduleConfig.lr_tails\[1\]:"),
    (dict(lr_tails=[(700, 2e-4)]), r"ScheduleConfig.lr_tails\[0\]:"),
    (dict(lr_tails=[700]), r"ScheduleConfig.lr_tails\[0\]:"),
    (dict(lr_tails=None), "ScheduleConfig.lr_tails:"),
    (dict(batch_start=20), "ScheduleConfig.batch_start:"),
    (dict(batch_end=18), "ScheduleConfig.batch_end:"),
    (dict(batch_granularity=0), "ScheduleConfig.batch_granularity:"),
    (dict(batch_ramp_tokens=-5), "ScheduleConfig.batch_ramp_tokens:"),
    (dict(mtp_weight=-0.1), "ScheduleConfig.mtp_weight:"),
    (dict(mtp_switch_tokens=True), "ScheduleConfig.mtp_switch_tokens:"),
    (dict(bias_update_speed=float("inf")), "ScheduleConfig.bias_update_speed:"),
    (dict(bias_freeze_tokens=-1), "ScheduleConfig.bias_freeze_tokens:"),
    (dict(seq_length=0), "ScheduleConfig.seq_length:"),
])
def test_bad_config_names_the_field(cfg, overrides, field):
    with pytest.raises(ConfigError, match=field) as err:
        dataclasses.replace(cfg, **overrides)
    assert "\n" not in str(err.value)


def test_bad_dicts_and_states_name_the_field(cfg):
    with pytest.raises(ConfigError, match="ScheduleConfig.lr_peak:"):
        ScheduleConfig.from_dict({"lr_peak": 1.0})
    with pytest.raises(ConfigError, match="ScheduleState.consumed_samples:"):
        Schedules(cfg, {"consumed_tokens": 0})
    with pytest.raises(ConfigError, match="ScheduleState.consumed_tokens:"):
        Schedules(cfg, {"consumed_tokens": -4, "consumed_samples": 0})
    with pytest.raises(ConfigError, match="ScheduleState.step:"):
        Schedules(cfg, {"consumed_tokens": 0, "consumed_samples": 0, "step": 3})


# -- schedule_for_run: what the recipe derives from its TrainConfig ----------------------------------------------

def test_v3_recipe_yaml_gives_v3_schedules_exactly():
    from pathlib import Path

    from moelib.config import RecipeConfig
    from moelib.train.schedules import schedule_for_run

    run = RecipeConfig.from_yaml(Path(__file__).parents[2] / "recipes" / "configs" / "v3-671b.yaml")
    cfg = schedule_for_run(run.train, 15360, overrides=run.schedule)
    assert cfg == ScheduleConfig.v3(batch_granularity=256)
    # train_iters is the number of steps that consume the 14.8T tokens
    assert tokens_for_steps(run.train.train_iters - 1, cfg) < 14_800 * 10**9 <= tokens_for_steps(
        run.train.train_iters, cfg)


def test_schedule_for_run_spans_train_iters():
    from moelib.train.schedules import schedule_for_run

    train = TrainConfig(seq_length=64, train_iters=100, lr=1e-3, min_lr=1e-4, lr_warmup_iters=10,
                        mtp_loss_weight=0.3, bias_update_speed=1e-3)
    s = Schedules(schedule_for_run(train, 16))
    values = [s.step() for _ in range(100)]
    assert {v.batch_size for v in values} == {16}
    assert values[9].lr == 1e-3 and values[0].lr == 1e-4  # warm-up over exactly 10 steps
    assert values[-1].lr == pytest.approx(1e-4 * 7.3e-6 / 2.2e-5) and values[-1].bias_update_speed == 0
    assert values[0].mtp_weight == 0.3 and values[-1].mtp_weight == pytest.approx(0.1)


def test_schedule_for_run_warmup_longer_than_the_constant_phase():
    from moelib.train.schedules import schedule_for_run

    train = TrainConfig(seq_length=64, train_iters=4, lr=1e-3, min_lr=1e-4, lr_warmup_iters=30)
    s = Schedules(schedule_for_run(train, 8))
    assert [v.lr for v in (s.step() for _ in range(4))] == pytest.approx([1e-3 * k / 30 for k in (1, 2, 3, 4)])


def test_schedule_for_run_ramp_and_bad_input():
    from moelib.train.schedules import schedule_for_run

    train = TrainConfig(seq_length=10, train_iters=20, lr_warmup_iters=2)
    s = Schedules(schedule_for_run(train, 16, rampup=(4, 4, 60)))
    sizes = [s.step().batch_size for _ in range(20)]
    assert sizes[0] == 4 and sizes[-1] == 16 and sizes == sorted(sizes) and set(sizes) <= {4, 8, 12, 16}
    with pytest.raises(ConfigError, match="rampup_batch_size.start: must lie in"):
        schedule_for_run(train, 16, rampup=(32, 4, 60))
    with pytest.raises(ConfigError, match="schedule.lr_peak: not a ScheduleConfig field"):
        schedule_for_run(train, 16, overrides={"lr_peak": 1.0})
    with pytest.raises(ConfigError, match="ScheduleConfig.batch_start"):
        schedule_for_run(train, 16, rampup=(6, 4, 60))  # 6 is off the grid of increment 4
