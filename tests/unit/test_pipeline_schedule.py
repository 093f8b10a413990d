"""Pipeline schedules: complete programs, placement, validation, the communication contract, timelines."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moelib.errors import ConfigError
from moelib.parallel.pipeline.schedule import Op, build_schedule, dualpipe, dualpipev, one_f_one_b, zb1p
from moelib.parallel.pipeline.simulate import (
    Costs,
    Event,
    ScheduleError,
    check_schedule,
    peak_activations,
    plot_timeline,
    simulate,
    to_chrome_trace,
)

CASES = (
    [("1f1b", pp, m) for pp in (1, 2, 3, 4, 8) for m in (1, pp, 2 * pp + 1)]
    + [("zb1p", pp, m) for pp in (1, 2, 3, 4, 8) for m in (1, pp, 2 * pp + 1)]
    + [("dualpipe", pp, m) for pp in (2, 4, 6, 8) for m in (2 * pp, 2 * pp + 2, 4 * pp)]
    + [("dualpipev", pp, m) for pp in (1, 2, 3, 4, 8) for m in (2 * pp, 2 * pp + 1, 3 * pp + 2)]
)


@pytest.mark.parametrize("name,pp,m", CASES)
def test_programs_complete_and_deadlock_free(name, pp, m):
    s = build_schedule(name, pp, m)
    check_schedule(s)  # one F and one backward per (mb, stage), W per I, messages matched, acyclic
    r = simulate(s, Costs(F=1, B=2, W=1, FB=3))
    assert len(r.events) == sum(map(len, s.programs))
    assert r.schedule.num_microbatches == m


def test_one_chunk_placement():
    for s in (one_f_one_b(4, 6), zb1p(4, 6)):
        assert s.num_stages == 4 and all(len(p) == 1 for p in s.placement)
        assert [s.stage_of(r, 0) for r in range(4)] == [0, 1, 2, 3]
        assert [s.rank_of(st) for st in range(4)] == [0, 1, 2, 3]
        assert {s.input_rank(mb) for mb in range(6)} == {0} and {s.loss_rank(mb) for mb in range(6)} == {3}


def test_dualpipe_placement_and_directions():
    pp, m = 6, 12
    s = dualpipe(pp, m)
    assert s.num_stages == pp
    for r in range(pp):
        assert (s.stage_of(r, 0), s.stage_of(r, 1)) == (r, pp - 1 - r)
    # Both directions run the same stages: forward through ranks 0..PP-1 on chunk 0, mirrored on chunk 1.
    assert [s.route[0][st] for st in range(pp)] == [(st, 0) for st in range(pp)]
    assert [s.route[1][st] for st in range(pp)] == [(pp - 1 - st, 1) for st in range(pp)]
    assert [s.rank_of(st, 1) for st in range(pp)] == list(range(pp - 1, -1, -1))
    assert s.direction == (0,) * 6 + (1,) * 6
    assert [s.input_rank(mb) for mb in (0, 5, 6, 11)] == [0, 0, pp - 1, pp - 1]
    assert [s.loss_rank(mb) for mb in (0, 5, 6, 11)] == [pp - 1, pp - 1, 0, 0]


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (6, 14), (8, 20)])
def test_every_dualpipe_rank_runs_both_chunks(pp, m):
    s = dualpipe(pp, m)
    for prog in s.programs:
        fwd = [op.forward for op in prog if op.forward is not None]
        assert sorted(mb for mb, c in fwd if c == 0) == list(range(m // 2))
        assert sorted(mb for mb, c in fwd if c == 1) == list(range(m // 2, m))


def test_dualpipev_placement():
    n, m = 3, 7
    s = dualpipev(n, m)
    assert s.num_stages == 2 * n and s.direction == (0,) * m
    for r in range(n):
        assert (s.stage_of(r, 0), s.stage_of(r, 1)) == (r, 2 * n - 1 - r)
    assert {s.input_rank(mb) for mb in range(m)} == {0} and {s.loss_rank(mb) for mb in range(m)} == {0}
    turn = s.produces(n - 1, Op("F", 0, 0))
    assert len(turn) == 1 and turn[0].local  # stage N-1 hands its output to stage N on the same rank


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 12), (8, 16), (8, 22)])
def test_dualpipe_phase_counts(pp, m):
    """The op mix of the public step(): phases 1-8 with counts 2(H-h-1), h+1, H-h-1, M/2-PP+h+1, H-h-1, h+1,
    H-h-1, h+1 (H = PP/2, h = min(r, PP-1-r)); phase 3 and 7 split B into I+W, half of phase 6 too."""
    s, half = dualpipe(pp, m), pp // 2
    for r, prog in enumerate(s.programs):
        h = min(r, pp - 1 - r)
        middle = h == half - 1
        kinds = [op.kind for op in prog]
        assert kinds.count("FB") == 2 * (m // 2 - pp + h + 1) + (half - h - 1) - middle
        assert kinds.count("I") == kinds.count("W") == 2 * (half - h - 1) + h + 1
        near = 0 if r < half else 1
        warm = 2 * (half - h - 1) + 1  # phase 1, then the first F of phase 2
        assert [(op.kind, op.chunk) for op in prog[:warm + 1]] == [("F", near)] * warm + [("F", 1 - near)]


@pytest.mark.parametrize("pp,m", [(4, 8), (8, 16), (8, 30)])
def test_peak_activations_match_table(pp, m):
    assert peak_activations(one_f_one_b(pp, m)) == [pp - r for r in range(pp)]
    assert peak_activations(zb1p(pp, m)) == [pp - r for r in range(pp)]
    assert peak_activations(dualpipe(pp, m)) == [pp + 1] * pp
    assert peak_activations(dualpipev(pp // 2, m)) == [pp + 1] * (pp // 2)  # pp stages on pp/2 ranks


@pytest.mark.parametrize("fn,pp,m,msg", [
    (dualpipe, 4, 6, "DualPipe needs an even number of micro-batches >= 2 x pipeline size (8), got 6"),
    (dualpipe, 4, 9, "DualPipe needs an even number of micro-batches >= 2 x pipeline size (8), got 9"),
    (dualpipe, 3, 12, "DualPipe needs an even pipeline size >= 2, got 3"),
    (dualpipe, 0, 12, "DualPipe needs an even pipeline size >= 2, got 0"),
    (dualpipev, 4, 7, "DualPipeV needs at least 2 x pipeline size (8) micro-batches, got 7"),
    (one_f_one_b, 4, 0, "1F1B needs at least 1 micro-batch, got 0"),
    (zb1p, 0, 4, "ZB1P needs a pipeline size >= 1, got 0"),
])
def test_validation_errors(fn, pp, m, msg):
    with pytest.raises(ConfigError) as e:
        fn(pp, m)
    assert str(e.value) == msg


def test_unknown_schedule_name():
    with pytest.raises(ConfigError, match="pipeline schedule must be one of"):
        build_schedule("gpipe", 4, 8)


def test_checker_catches_broken_programs():
    s = one_f_one_b(2, 2)
    progs = [list(p) for p in s.programs]
    missing = dataclasses.replace(s, programs=(tuple(progs[0][:-1]), tuple(progs[1])))
    with pytest.raises(ScheduleError, match="missing"):
        check_schedule(missing)
    # Rank 0 wants B0 (needs rank 1's B0) before F1, rank 1 wants F1 (needs rank 0's F1) before B0: a cycle.
    crossed = dataclasses.replace(s, programs=(
        (Op("F", 0, 0), Op("B", 0, 0), Op("F", 1, 0), Op("B", 1, 0)),
        (Op("F", 0, 0), Op("F", 1, 0), Op("B", 0, 0), Op("B", 1, 0)),
    ))
    with pytest.raises(ScheduleError, match="deadlock"):
        check_schedule(crossed)
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(crossed, Costs(1, 2))
    z = zb1p(2, 2)
    w_first = [list(p) for p in z.programs]
    i = next(k for k, op in enumerate(w_first[0]) if op.kind == "W")
    w_first[0].insert(0, w_first[0].pop(i))
    with pytest.raises(ScheduleError, match="weight-grad"):
        check_schedule(dataclasses.replace(z, programs=tuple(map(tuple, w_first))))


def test_waiting_for_sends_before_the_next_op_deadlocks_dualpipe():
    """Contract rule 3: sends are waited for only at the end of the step."""
    for s in (one_f_one_b(4, 8), zb1p(4, 8), dualpipev(1, 4)):
        check_schedule(s, "batched")
    for s in (dualpipe(2, 4), dualpipe(8, 16), dualpipev(4, 8)):
        with pytest.raises(ScheduleError, match="batched"):
            check_schedule(s, "batched")


def test_recv_plan_keeps_each_senders_order():
    s = dualpipe(6, 12)
    # Receiving at the consuming op would take rank 0's messages to rank 1 out of send order here ...
    sent = [m for op in s.programs[0] for m in s.produces(0, op) if m.dst == 1]
    lazy = [m for op in s.programs[1] for m in s.consumes(1, op) if m.src == 0]
    assert sorted(sent) == sorted(lazy) and sent != lazy
    # ... the plan posts them in send order, never after the op that needs them (check_schedule checks all).
    plan = s.recv_plan(1)
    assert [m for ms in plan for m in ms if m.src == 0] == sent
    # Where lazy order already matches (1F1B) the plan is exactly "receive at the consuming op".
    f = one_f_one_b(4, 8)
    for r in range(4):
        assert f.recv_plan(r) == [[m for m in f.consumes(r, op) if not m.local] for op in f.programs[r]]


def test_chrome_trace_and_png(tmp_path):
    r = simulate(dualpipe(4, 8), Costs(F=1, B=2, W=1, FB=3))
    trace = to_chrome_trace(r.events, time_scale=1.0)
    json.dumps(trace)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    threads = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert threads == {f"rank {i}" for i in range(4)}
    names = {e["name"] for e in spans}
    assert {"F0", "I4", "W4", "B6", "F3&B5"} <= names
    assert len(spans) == len(r.events)
    # A real run's events arrive as dicts, with comm spans on their own stream.
    rec = [dict(rank=0, kind="F", mb=0, chunk=0, start=0.0, end=0.5),
           dict(rank=0, kind="A2A", mb=0, chunk=0, start=0.1, end=0.3, stream="comm"),
           Event(1, "B", 0, 0, 0.5, 1.5)]
    t = to_chrome_trace(rec)
    assert {e["args"]["name"] for e in t["traceEvents"] if e["name"] == "thread_name"} == {
        "rank 0", "rank 0 comm", "rank 1"}
    assert [e["dur"] for e in t["traceEvents"] if e["ph"] == "X"] == pytest.approx([5e5, 2e5, 1e6])
    for events in (r.events, rec):
        path = tmp_path / "timeline.png"
        plot_timeline(events, str(path), title="test")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
