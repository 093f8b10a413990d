"""The simulator reproduces REFERENCE.md section 5 exactly (hypothesis over PP, micro-batches and costs).

Costs are exact Fractions (integers over a random common denominator), so equality is exact. Each test
draws costs inside the assumptions documented in moelib/parallel/pipeline/simulate.py; the last tests pin
down what happens outside them.
"""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.parallel.pipeline.schedule import build_schedule, dualpipe, dualpipev, forward_only, one_f_one_b, zb1p
from moelib.parallel.pipeline.simulate import Costs, _check_acyclic, _check_messages, published_bubble, simulate

SETTINGS = settings(max_examples=60, deadline=None)
UNITS = st.integers(1, 60)  # cost numerators
DENOMS = st.integers(1, 7)  # a common denominator, so costs are arbitrary rationals
frac = Fraction


@SETTINGS
@given(pp=st.integers(1, 8), data=st.data(), f=UNITS, b=UNITS, d=DENOMS)
def test_1f1b_bubble_and_memory(pp, data, f, b, d):
    m = data.draw(st.integers(1, 3 * pp + 2))
    s, c = one_f_one_b(pp, m), Costs(F=frac(f, d), B=frac(b, d))
    r = simulate(s, c)
    assert r.idle == [(pp - 1) * (c.F + c.B)] * pp  # every rank idles the same
    assert r.bubble == published_bubble(s, c)
    assert r.peak_activations == [min(m, pp - rank) for rank in range(pp)]


@SETTINGS
@given(pp=st.integers(1, 8), data=st.data(), f=UNITS, d=DENOMS)
def test_zb1p_bubble_and_memory(pp, data, f, d):
    # Assumptions: M >= PP, W <= F, W <= I (= B - W).
    m = data.draw(st.integers(pp, 3 * pp + 2))
    w = data.draw(st.integers(0, f))
    i = data.draw(st.integers(w, 80))
    s, c = zb1p(pp, m), Costs(F=frac(f, d), B=frac(i + w, d), W=frac(w, d))
    r = simulate(s, c)
    assert r.idle == [(pp - 1) * (c.F + c.B - 2 * c.W)] * pp
    assert r.bubble == published_bubble(s, c)
    assert r.peak_activations == [pp - rank for rank in range(pp)]


@st.composite
def dualpipe_costs(draw):
    """I = F (B = F + W), W <= F, B <= F&B <= F + B."""
    d = draw(DENOMS)
    f = draw(UNITS)
    w = draw(st.integers(0, f))
    b = f + w
    fb = draw(st.integers(b, f + b))
    return Costs(F=frac(f, d), B=frac(b, d), W=frac(w, d), FB=frac(fb, d))


@SETTINGS
@given(pp=st.sampled_from([2, 4, 6, 8]), extra=st.integers(0, 6), c=dualpipe_costs())
def test_dualpipe_bubble_and_memory(pp, extra, c):
    m = 2 * pp + 2 * extra
    r = simulate(dualpipe(pp, m), c)
    assert r.bubble == (pp // 2 - 1) * (c.FB + c.B - 3 * c.W) == published_bubble(r.schedule, c)
    assert r.peak_activations == [pp + 1] * pp


@SETTINGS
@given(stages=st.sampled_from([2, 4, 6, 8]), extra=st.integers(0, 12), c=dualpipe_costs())
def test_dualpipev_bubble_and_memory(stages, extra, c):
    n = stages // 2  # the table's PP is the number of stages; DualPipeV runs them on PP/2 ranks
    r = simulate(dualpipev(n, 2 * n + extra), c)
    assert r.bubble == (stages // 2 - 1) * (c.FB + c.B - 3 * c.W) == published_bubble(r.schedule, c)
    assert r.peak_activations == [stages + 1] * n


@SETTINGS
@given(pp=st.sampled_from([2, 4, 6, 8]), extra=st.integers(0, 6), data=st.data())
def test_dualpipe_idles_less_than_1f1b(pp, extra, data):
    """Any costs with F&B < F + B (no I = F assumption): less idle per rank and as a fraction of time."""
    f, b = data.draw(UNITS), data.draw(UNITS)
    w = data.draw(st.integers(0, b))
    fb = data.draw(st.integers(max(f, b), f + b - 1))
    c, m = Costs(F=f, B=b, W=w, FB=fb), 2 * pp + 2 * extra
    dp, base = simulate(dualpipe(pp, m), c), simulate(one_f_one_b(pp, m), c)
    assert dp.bubble < base.bubble
    assert dp.bubble_fraction < base.bubble_fraction


def test_dualpipe_formula_needs_input_grad_equal_to_forward():
    """Outside I = F the published formula is not the schedule's bubble (here I = 15 > F = 10)."""
    c = Costs(F=10, B=20, W=5, FB=25)
    r = simulate(dualpipe(4, 8), c)
    assert r.bubble == 25 and published_bubble(r.schedule, c) == 30


def test_local_hand_off_has_no_latency():
    """DualPipeV on one rank passes everything locally: a comm latency changes nothing."""
    s = dualpipev(1, 4)
    assert simulate(s, Costs(1, 2, 1, 3, comm=5)).makespan == simulate(s, Costs(1, 2, 1, 3)).makespan
    assert simulate(one_f_one_b(2, 4), Costs(1, 2, comm=5)).makespan > simulate(one_f_one_b(2, 4), Costs(1, 2)).makespan


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(["1f1b", "zb1p", "dualpipe", "dualpipev"]), half=st.integers(1, 4), data=st.data())
def test_forward_only_programs_run_each_forward_once_and_cannot_deadlock(name, half, data):
    pp = 2 * half if name == "dualpipe" else data.draw(st.integers(1, 8))
    m = data.draw(st.integers(2 * pp, 4 * pp)) if name.startswith("dual") else data.draw(st.integers(1, 3 * pp))
    m += m % 2 if name == "dualpipe" else 0
    train = build_schedule(name, pp, m)
    s = forward_only(train)
    for r, prog in enumerate(s.programs):
        assert all(op.kind == "F" for op in prog)
        owned = sorted((mb, c) for c in range(len(s.placement[r])) for mb in s.microbatches_of(r, c))
        assert sorted(op.forward for op in prog) == owned  # every forward of the training schedule, once
    _check_messages(s)
    _check_acyclic(s, "eager")  # the runtime's contract (DualPipe's training programs also need it)
