"""Execute pipeline schedules with per-op costs, check them against the contract, draw timelines.

Timing model (the eager contract of ``schedule.py``): each rank runs its program in order; an op starts when
the rank is free and every message it consumes has arrived; messages leave when the producing op ends and
arrive ``comm`` later (a hand-off within a rank is immediate). Durations: F, B, W and FB (F&B) as given,
I = B - W, an FB whose backward defers W costs FB - W. The arithmetic is that of the numbers given: use
ints or Fractions for exact results.

Bubble. A rank's idle time is makespan - (sum of its op durations), measured over [0, makespan] of the whole
step. ``SimResult.bubble`` is the largest idle time over ranks (= makespan - the least busy rank's work).
With zero comm latency this equals REFERENCE.md section 5 exactly (tests/property/test_pipeline_simulate.py):

    1F1B       (PP-1)(F+B)          any F, B > 0 and M >= 1; every rank idles the same
    ZB1P       (PP-1)(F+B-2W)       M >= PP, W <= F and W <= B - W (the last rank starts (PP-1)F late
                                    and idles no more, so the formula cannot go below (PP-1)F)
    DualPipe   (PP/2-1)(F&B+B-3W)   I = F (B = F + W: the input-grad costs what the forward does, as with
                                    one GEMM per linear each for F, I and W), W <= F, B <= F&B <= F + B;
                                    the middle ranks idle most, the outer ones less
    DualPipeV  (N-1)(F&B+B-3W)      the same on N ranks (2N stages: the table's PP is 2N)

Outside the DualPipe assumptions the formula is not exact (the schedule's idle depends on F too); the
simulator still gives the schedule's true bubble. Peak activations (``peak_activations``) count the chunks
whose forward has run and whose I or B has not finished: 1F1B and ZB1P hold PP on rank 0 (PP - r on rank
r), DualPipe PP + 1 on every rank, DualPipeV 2N + 1, each in units of one stage's activations.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from numbers import Real
from typing import Any

from moelib.parallel.pipeline.schedule import KINDS, Message, Op, Schedule


class ScheduleError(RuntimeError):
    """A program is incomplete, its messages cannot be matched in order, or it can deadlock."""


@dataclass(frozen=True)
class Costs:
    F: Real
    B: Real
    W: Real = 0
    FB: Real | None = None  # F&B; None means F + B (no overlap gain)
    comm: Real = 0  # latency of a message between ranks

    def of(self, op: Op, rank: int = 0) -> Real:
        """Duration of ``op`` on ``rank``: the same everywhere here; a subclass may vary it by stage."""
        if op.kind == "FB":
            fb = self.F + self.B if self.FB is None else self.FB
            return fb - self.W if op.defer_w else fb
        return {"F": self.F, "B": self.B, "I": self.B - self.W, "W": self.W}[op.kind]


@dataclass(frozen=True)
class Event:
    """One timed span on one rank: a schedule op, or anything else (e.g. an all-to-all on stream "comm")."""

    rank: int
    kind: str
    mb: int
    chunk: int
    start: float
    end: float
    b_mb: int | None = None  # F&B: the backward half's micro-batch and chunk
    b_chunk: int | None = None
    stream: str = "compute"

    @property
    def name(self) -> str:
        return f"F{self.mb}&B{self.b_mb}" if self.kind == "FB" else f"{self.kind}{self.mb}"


@dataclass(frozen=True)
class SimResult:
    schedule: Schedule
    costs: Costs
    events: list[Event]
    makespan: Real
    busy: list[Real]  # per rank: sum of its op durations
    peak_activations: list[int]  # per rank

    @property
    def idle(self) -> list[Real]:
        """Per rank: time in [0, makespan] not spent computing."""
        return [self.makespan - b for b in self.busy]

    @property
    def bubble(self) -> Real:
        """The largest per-rank idle time: what REFERENCE.md section 5 tabulates."""
        return max(self.idle)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks' time."""
        return float(sum(self.idle)) / float(self.makespan * len(self.busy))


def published_bubble(s: Schedule, costs: Costs) -> Real:
    """REFERENCE.md section 5's bubble for this schedule and these costs (exact under the module's
    assumptions). For DualPipeV the table's PP is the number of stages, 2N."""
    fb = costs.F + costs.B if costs.FB is None else costs.FB
    if s.name == "1F1B":
        return (s.pp - 1) * (costs.F + costs.B)
    if s.name == "ZB1P":
        return (s.pp - 1) * (costs.F + costs.B - 2 * costs.W)
    return (s.num_stages // 2 - 1) * (fb + costs.B - 3 * costs.W)


# ---------------------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------------------


def peak_activations(s: Schedule) -> list[int]:
    """Per rank, the most forward chunks held at once. An F&B counts its new forward before its backward
    frees one, since both are live while it runs. Inputs kept for deferred W's are not counted (the
    convention of the published table, where ZB1P holds PP like 1F1B)."""
    peaks = []
    for prog in s.programs:
        live = peak = 0
        for op in prog:
            live += op.forward is not None
            peak = max(peak, live)
            live -= op.backward is not None
        peaks.append(peak)
    return peaks


def simulate(s: Schedule, costs: Costs) -> SimResult:
    """Run every rank's program in order under the eager contract; raise ScheduleError on deadlock."""
    arrival: dict[Message, Real] = {}
    free = [0] * s.pp
    ptr = [0] * s.pp
    events: list[Event] = []
    progress = True
    while progress:  # each pass advances every rank as far as its messages allow
        progress = False
        for r, prog in enumerate(s.programs):
            while ptr[r] < len(prog):
                op = prog[ptr[r]]
                needs = s.consumes(r, op)
                if any(m not in arrival for m in needs):
                    break
                start = max([free[r], *(arrival[m] for m in needs)])
                end = start + costs.of(op, r)
                for m in s.produces(r, op):
                    arrival[m] = end if m.local else end + costs.comm
                events.append(Event(r, op.kind, op.mb, op.chunk, start, end, op.b_mb, op.b_chunk))
                free[r], ptr[r], progress = end, ptr[r] + 1, True
    stuck = [(r, prog[ptr[r]].name) for r, prog in enumerate(s.programs) if ptr[r] < len(prog)]
    if stuck:
        raise ScheduleError(f"{s.name}: deadlock, ranks wait at {stuck}")
    busy = [sum((costs.of(op, r) for op in prog), 0) for r, prog in enumerate(s.programs)]
    return SimResult(s, costs, events, max(free), busy, peak_activations(s))


# ---------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------


def _check_complete(s: Schedule) -> None:
    for r, prog in enumerate(s.programs):
        owned = {(mb, c) for c in range(len(s.placement[r])) for mb in s.microbatches_of(r, c)}
        fwd, bwd, pending = set(), set(), []
        for op in prog:
            if op.kind not in KINDS:
                raise ScheduleError(f"{s.name} rank {r}: unknown op kind {op.kind!r}")
            if op.forward is not None:
                if op.forward not in owned or op.forward in fwd:
                    raise ScheduleError(f"{s.name} rank {r}: unexpected or repeated forward {op.name}")
                fwd.add(op.forward)
            if op.backward is not None:
                if op.backward not in fwd or op.backward in bwd:
                    raise ScheduleError(f"{s.name} rank {r}: backward {op.name} before its forward or repeated")
                bwd.add(op.backward)
                if op.defers_w:
                    pending.append(op.backward)
            if op.kind == "W" and (not pending or pending.pop(0) != (op.mb, op.chunk)):
                raise ScheduleError(f"{s.name} rank {r}: {op.name} is not the oldest deferred weight-grad")
        if fwd != owned or bwd != owned or pending:
            raise ScheduleError(f"{s.name} rank {r}: missing forwards, backwards or weight-grads")


def _check_messages(s: Schedule) -> None:
    """Every message is sent once and consumed once; the receive plan posts each one once, no later than
    its consumer, and per sender in that sender's send order."""
    sent = [m for r, prog in enumerate(s.programs) for op in prog for m in s.produces(r, op)]
    used = [m for r, prog in enumerate(s.programs) for op in prog for m in s.consumes(r, op)]
    if len(set(sent)) != len(sent) or sorted(sent) != sorted(used):
        raise ScheduleError(f"{s.name}: some message is sent or consumed twice, or never")
    if len({(m.kind, m.mb, m.src, m.dst) for m in sent}) != len(sent):
        raise ScheduleError(f"{s.name}: (kind, mb) does not identify a message between two ranks")
    for r, prog in enumerate(s.programs):
        plan = s.recv_plan(r)
        when = {m: k for k, ms in enumerate(plan) for m in ms}
        if sum(map(len, plan)) != len(when):
            raise ScheduleError(f"{s.name} rank {r}: the receive plan posts a message twice")
        for k, op in enumerate(prog):
            for m in s.consumes(r, op):
                if not m.local and when.get(m, k + 1) > k:
                    raise ScheduleError(f"{s.name} rank {r}: {m} is not received by {op.name}")
        posted = [m for ms in plan for m in ms]
        for src in range(s.pp):
            if [m for m in posted if m.src == src] != [m for m in sent if m.src == src and m.dst == r and not m.local]:
                raise ScheduleError(f"{s.name}: rank {r} posts receives from rank {src} out of send order")


def _check_acyclic(s: Schedule, contract: str) -> None:
    """Nodes (rank, k, 0) = op k starts, (rank, k, 1) = op k ends; a cycle is a possible deadlock."""
    edges: dict[tuple, list[tuple]] = {}

    def edge(a: tuple, b: tuple) -> None:
        edges.setdefault(a, []).append(b)

    producer: dict[Message, tuple[int, int]] = {}
    for r, prog in enumerate(s.programs):
        for k, op in enumerate(prog):
            edge((r, k, 0), (r, k, 1))
            if k:
                edge((r, k - 1, 1), (r, k, 0))
            for m in s.produces(r, op):
                producer[m] = (r, k)
    for r, prog in enumerate(s.programs):
        for k, op in enumerate(prog):
            for m in s.consumes(r, op):
                edge((*producer[m], 1), (r, k, 0))
        if contract == "batched":
            # Before op j a rank posts op j-1's sends and op j's planned receives, and waits for all of them: a
            # receive completes once its producer has ended, a send once the receiver has posted the receive.
            for j, ms in enumerate(s.recv_plan(r)):
                for m in ms:
                    pr, pk = producer[m]
                    edge((pr, pk, 1), (r, j, 0))
                    if j and pk + 1 < len(s.programs[pr]):
                        edge((r, j - 1, 1), (pr, pk + 1, 0))
    indeg = {(r, k, e): 0 for r, prog in enumerate(s.programs) for k in range(len(prog)) for e in (0, 1)}
    for outs in edges.values():
        for v in outs:
            indeg[v] += 1
    todo = [v for v, d in indeg.items() if d == 0]
    seen = 0
    while todo:
        v = todo.pop()
        seen += 1
        for u in edges.get(v, ()):
            indeg[u] -= 1
            if indeg[u] == 0:
                todo.append(u)
    if seen != len(indeg):
        raise ScheduleError(f"{s.name}: can deadlock under the {contract} contract")


def check_schedule(s: Schedule, contract: str = "eager") -> None:
    """Raise ScheduleError unless every (mb, stage) has one forward and one backward on the rank that holds
    it and every deferred weight-grad one W (FIFO order); every message has one sender and one consumer and
    ``recv_plan`` posts receives in send order; and the programs cannot deadlock under ``contract``:
    "eager" (non-blocking sends, a rank blocks only for the messages of the op it is about to run) or
    "batched" (also waits, before each op, for the previous op's sends and for every receive it posts)."""
    if contract not in ("eager", "batched"):
        raise ValueError(f"contract must be 'eager' or 'batched', got {contract!r}")
    _check_complete(s)
    _check_messages(s)
    _check_acyclic(s, contract)


# ---------------------------------------------------------------------------------------------------
# Timelines
# ---------------------------------------------------------------------------------------------------

COLOURS = {"F": "#4c72b0", "B": "#55a868", "I": "#8fd19e", "W": "#dd8452", "FB": "#8172b3"}


def _as_event(e: Event | dict[str, Any]) -> Event:
    if isinstance(e, Event):
        return e
    names = {f.name for f in fields(Event)}
    return Event(**{k: v for k, v in e.items() if k in names})


def bubble_fraction(events: list[Event | dict[str, Any]]) -> float:
    """Idle share of compute time over all ranks, between the first start and the last end."""
    evs = [_as_event(e) for e in events]
    comp = [e for e in evs if e.stream == "compute"]
    if not comp:
        return 0.0
    t0, t1 = min(e.start for e in comp), max(e.end for e in comp)
    ranks = {e.rank for e in comp}
    busy = sum(e.end - e.start for e in comp)
    return 1.0 - float(busy) / (float(t1 - t0) * len(ranks)) if t1 > t0 else 0.0


def to_chrome_trace(events: list[Event | dict[str, Any]], time_scale: float = 1e6) -> dict:
    """Chrome trace JSON (chrome://tracing, Perfetto): one thread per rank and stream. ``time_scale``
    converts event times to microseconds (1e6 for seconds; 1.0 for the simulator's abstract units)."""
    evs = [_as_event(e) for e in events]
    t0 = min((e.start for e in evs), default=0)
    lanes = sorted({(e.rank, e.stream != "compute", e.stream) for e in evs})
    tid = {(r, st): i for i, (r, _, st) in enumerate(lanes)}
    out: list[dict] = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "pipeline"}}]
    for (r, st), i in tid.items():
        label = f"rank {r}" if st == "compute" else f"rank {r} {st}"
        out.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": i, "args": {"name": label}})
        out.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": i, "args": {"sort_index": i}})
    for e in evs:
        args = {"mb": e.mb, "chunk": e.chunk}
        if e.b_mb is not None:
            args.update(b_mb=e.b_mb, b_chunk=e.b_chunk)
        out.append({"name": e.name, "cat": e.kind, "ph": "X", "pid": 0, "tid": tid[(e.rank, e.stream)],
                    "ts": float(e.start - t0) * time_scale, "dur": float(e.end - e.start) * time_scale, "args": args})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def plot_timeline(events: list[Event | dict[str, Any]], path: str, title: str = "") -> None:
    """A PNG timeline: one row per rank (rank 0 on top), a colour per op kind, other streams as a thin
    hatched band under their rank's row; the title gives the bubble fraction."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    evs = [_as_event(e) for e in events]
    ranks = sorted({e.rank for e in evs})
    t0 = min((e.start for e in evs), default=0)
    span = float(max((e.end for e in evs), default=1) - t0) or 1.0
    fig = Figure(figsize=(max(8.0, min(24.0, len(evs) / 12)), 0.6 * len(ranks) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    label = len(evs) <= 400
    for e in evs:
        y = ranks.index(e.rank)
        x, w = float(e.start - t0), float(e.end - e.start)
        colour = COLOURS.get(e.kind, "#999999")
        if e.stream == "compute":
            ax.barh(y, w, left=x, height=0.8, color=colour, edgecolor="black", linewidth=0.3)
            if label and w > span / 60:
                ax.text(x + w / 2, y, e.name, ha="center", va="center", fontsize=6)
        else:
            ax.barh(y + 0.45, w, left=x, height=0.15, color=colour, hatch="//", edgecolor="black", linewidth=0.2)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    kinds = [k for k in COLOURS if any(e.kind == k for e in evs)]
    ax.legend(handles=[Patch(color=COLOURS[k], label="F&B" if k == "FB" else k) for k in kinds],
              loc="upper right", fontsize=7, ncol=len(kinds) or 1)
    ax.set_title(f"{title + ': ' if title else ''}bubble {bubble_fraction(evs):.1%}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
