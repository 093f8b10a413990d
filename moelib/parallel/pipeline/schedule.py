"""Pipeline schedules as per-rank instruction lists: 1F1B, ZB1P (ZB-H1), DualPipe and DualPipeV.

Pure Python, no torch: a runtime executes these programs with real send/recv, and ``simulate.py`` executes
them with costs. Both must follow the contract below; the simulator checks every schedule against it.

Model and placement
    The model is cut into ``num_stages`` stages. A rank holds one chunk (1F1B, ZB1P: chunk 0 = stage r) or
    two (DualPipe: chunk 0 = stage r, chunk 1 = stage PP-1-r, a mirror copy with the same layers whose
    gradients are summed with the original's after the step; DualPipeV on N ranks: chunk 0 = stage r,
    chunk 1 = stage 2N-1-r). ``Schedule.route[d][s]`` is the (rank, chunk) that runs stage ``s`` for
    micro-batches flowing in direction ``d``; ``direction[mb]`` says which way micro-batch ``mb`` flows.
    Only DualPipe has direction 1: micro-batches ``M/2 .. M-1`` enter at rank PP-1 (chunk 1) and their loss
    is computed on rank 0; micro-batches ``0 .. M/2-1`` enter at rank 0 (chunk 0), loss on rank PP-1.
    A micro-batch always uses the same chunk index on a DualPipe rank (its direction); in DualPipeV it uses
    chunk 0 on the way out and chunk 1 on the way back.

Instructions (``Op``), for a rank whose chunk ``c`` holds stage ``s`` (direction d = direction[mb])
    F  (mb, c)  forward. Consumes the activation of (mb, s-1), or the micro-batch input if s == 0.
                Produces the activation of (mb, s) for route[d][s+1], or the loss if s is the last stage.
    B  (mb, c)  full backward (input-grad and weight-grad). Consumes the output-grad of (mb, s) sent by
                route[d][s+1] (or the loss, on the last stage) and the saved activations of F(mb, c).
                Produces the input-grad of (mb, s) for route[d][s-1] (nothing if s == 0).
    I  (mb, c)  like B but computes only the input-grad; the weight-grad is deferred to a later W.
    W  (mb, c)  the deferred weight-grad of the I (or deferring FB) of (mb, c) on the same rank. W ops on a
                rank come in the same order as the deferring ops they complete, so a FIFO store works.
    FB (mb, c, b_mb, b_chunk)  DualPipe's F&B: the forward of (mb, c) overlapped with the backward of
                (b_mb, b_chunk); it consumes and produces what F and B (or I, when ``defer_w``) would.
    ``Op.forward`` and ``Op.backward`` give the (mb, chunk) of each half, or None.

Messages (``Schedule.consumes`` / ``Schedule.produces``; ``Message(kind, mb, stage, src, dst)``)
    "A" (mb, s): the activation out of stage s, sent by the forward of (mb, s) to the rank of stage s+1.
    "G" (mb, s): the input-grad of stage s, sent by the backward (B, I or FB's half) of (mb, s) to the
    rank of stage s-1. A message with src == dst (DualPipeV's turn at rank N-1) is a local hand-off.

Execution and communication contract (what the runtime must do; ``simulate.check_schedule`` checks it)
    1. Each rank runs its program strictly in order, one op at a time. Data dependencies are the only
       synchronisation: no barriers, no waiting on another rank except for a message an op consumes.
    2. Before an op starts the rank blocks until every message the op consumes has arrived (for FB, the
       activation, then the gradient).
    3. When an op ends its messages are sent without blocking (activation, then gradient). The rank does
       not wait for its sends before later ops; it waits for all of them when the step ends. (Waiting for
       an op's sends before the next op, as a batched send+recv would, can deadlock DualPipe and DualPipeV:
       ``check_schedule(s, "batched")`` finds the cycle. The public DualPipe escapes it by delaying some
       sends by hand; this contract needs no such special cases.)
    4. Matching: tag each message by (kind, mb, stage) and receive it at the op that needs it, or, without
       tags (NCCL), post receives as ``Schedule.recv_plan(rank)`` says: before op k, the receives listed
       for k, in that order. The plan posts each sender's messages in that sender's send order, which
       plain lazy posting does not do for DualPipe with PP >= 6 and DualPipeV with N >= 3.
    Under 1-4 every schedule here is deadlock-free: program order plus message edges form an acyclic graph
    (``check_schedule``), so some rank can always make progress.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from moelib.errors import ConfigError

KINDS = ("F", "B", "I", "W", "FB")


@dataclass(frozen=True)
class Op:
    kind: str
    mb: int
    chunk: int
    b_mb: int | None = None  # FB only: the backward half's micro-batch and chunk
    b_chunk: int | None = None
    defer_w: bool = False  # FB only: the backward half is input-grad only, a later W completes it

    @property
    def forward(self) -> tuple[int, int] | None:
        return (self.mb, self.chunk) if self.kind in ("F", "FB") else None

    @property
    def backward(self) -> tuple[int, int] | None:
        if self.kind in ("B", "I"):
            return (self.mb, self.chunk)
        return (self.b_mb, self.b_chunk) if self.kind == "FB" else None

    @property
    def defers_w(self) -> bool:
        return self.kind == "I" or (self.kind == "FB" and self.defer_w)

    @property
    def name(self) -> str:
        if self.kind == "FB":
            return f"F{self.mb}&{'I' if self.defer_w else 'B'}{self.b_mb}"
        return f"{self.kind}{self.mb}"


def fb(f: tuple[int, int], b: tuple[int, int], defer_w: bool = False) -> Op:
    return Op("FB", f[0], f[1], b[0], b[1], defer_w)


class Message(NamedTuple):
    """A tensor between two ops: "A" is the activation out of ``stage``, "G" the input-grad of ``stage``."""

    kind: str
    mb: int
    stage: int
    src: int  # sending rank
    dst: int  # receiving rank (== src for a local hand-off)

    @property
    def local(self) -> bool:
        return self.src == self.dst


@dataclass(frozen=True)
class Schedule:
    name: str
    pp: int  # number of pipeline ranks
    num_microbatches: int
    num_stages: int
    placement: tuple[tuple[int, ...], ...]  # placement[rank][chunk] = stage
    route: tuple[tuple[tuple[int, int], ...], ...]  # route[direction][stage] = (rank, chunk)
    direction: tuple[int, ...]  # direction[mb]
    programs: tuple[tuple[Op, ...], ...]

    def stage_of(self, rank: int, chunk: int) -> int:
        return self.placement[rank][chunk]

    def rank_of(self, stage: int, direction: int = 0) -> int:
        return self.route[direction][stage][0]

    def chunk_of(self, stage: int, direction: int = 0) -> int:
        return self.route[direction][stage][1]

    def input_rank(self, mb: int) -> int:
        return self.route[self.direction[mb]][0][0]

    def loss_rank(self, mb: int) -> int:
        return self.route[self.direction[mb]][-1][0]

    def microbatches_of(self, rank: int, chunk: int) -> list[int]:
        """Micro-batches whose path passes through (rank, chunk), in ascending order."""
        return [mb for mb, d in enumerate(self.direction) if (rank, chunk) in self.route[d]]

    def next_hop(self, mb: int, rank: int, chunk: int) -> tuple[int, int] | None:
        """Where F(mb) on (rank, chunk) sends its activation; None on the last stage (loss)."""
        s = self.stage_of(rank, chunk)
        return self.route[self.direction[mb]][s + 1] if s + 1 < self.num_stages else None

    def prev_hop(self, mb: int, rank: int, chunk: int) -> tuple[int, int] | None:
        """Where the backward of mb on (rank, chunk) sends its input-grad; None on stage 0."""
        s = self.stage_of(rank, chunk)
        return self.route[self.direction[mb]][s - 1] if s > 0 else None

    def consumes(self, rank: int, op: Op) -> list[Message]:
        """Messages ``op`` on ``rank`` waits for, activation before gradient (local hand-offs included)."""
        out = []
        if op.forward is not None:
            mb, c = op.forward
            s = self.stage_of(rank, c)
            if s > 0:
                out.append(Message("A", mb, s - 1, self.route[self.direction[mb]][s - 1][0], rank))
        if op.backward is not None:
            mb, c = op.backward
            s = self.stage_of(rank, c)
            if s + 1 < self.num_stages:
                out.append(Message("G", mb, s + 1, self.route[self.direction[mb]][s + 1][0], rank))
        return out

    def produces(self, rank: int, op: Op) -> list[Message]:
        """Messages ``op`` on ``rank`` sends when it ends, activation before gradient."""
        out = []
        if op.forward is not None:
            hop = self.next_hop(op.forward[0], rank, op.forward[1])
            if hop is not None:
                out.append(Message("A", op.forward[0], self.stage_of(rank, op.forward[1]), rank, hop[0]))
        if op.backward is not None:
            hop = self.prev_hop(op.backward[0], rank, op.backward[1])
            if hop is not None:
                out.append(Message("G", op.backward[0], self.stage_of(rank, op.backward[1]), rank, hop[0]))
        return out

    def recv_plan(self, rank: int) -> list[list[Message]]:
        """For each op of ``rank``, the receives to post just before it, in posting order.

        A receive is posted at the first op that needs it or needs a later message from the same sender, so
        that per sender the receives are posted in exactly the order that sender sends: untagged FIFO
        matching (NCCL) then pairs every message with the right buffer. Posting a receive early never
        blocks; the op still waits only for the messages it consumes."""
        order: dict[int, list[Message]] = {}  # src -> messages to this rank in src's send order
        for src, prog in enumerate(self.programs):
            if src != rank:
                order[src] = [m for op in prog for m in self.produces(src, op) if m.dst == rank]
        position = {m: i for seq in order.values() for i, m in enumerate(seq)}
        posted = dict.fromkeys(order, 0)
        plan = []
        for op in self.programs[rank]:
            now = []
            for m in self.consumes(rank, op):
                if not m.local and position[m] >= posted[m.src]:
                    now += order[m.src][posted[m.src]:position[m] + 1]
                    posted[m.src] = position[m] + 1
            plan.append(now)
        return plan


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def _check_common(name: str, pp: int, m: int) -> None:
    if not isinstance(pp, int) or pp < 1:
        raise ConfigError(f"{name} needs a pipeline size >= 1, got {pp}")
    if not isinstance(m, int) or m < 1:
        raise ConfigError(f"{name} needs at least 1 micro-batch, got {m}")


def _check_dualpipe(pp: int, m: int) -> None:
    # The public DualPipe's rules (and REFERENCE.md's): the directions split ranks and micro-batches in
    # halves. The phases would also fit M = 2PP-2 (rank 0's warm-up needs PP-1 of each half), not less;
    # we keep the published bound.
    if not isinstance(pp, int) or pp < 2 or pp % 2:
        raise ConfigError(f"DualPipe needs an even pipeline size >= 2, got {pp}")
    if not isinstance(m, int) or m % 2 or m < 2 * pp:
        raise ConfigError(f"DualPipe needs an even number of micro-batches >= 2 x pipeline size ({2 * pp}), got {m}")


def _check_dualpipev(pp: int, m: int) -> None:
    # The public DualPipeV asserts M >= 2 x ranks (no parity rule: all micro-batches enter at rank 0).
    _check_common("DualPipeV", pp, m)
    if m < 2 * pp:
        raise ConfigError(f"DualPipeV needs at least 2 x pipeline size ({2 * pp}) micro-batches, got {m}")


# ---------------------------------------------------------------------------------------------------
# Single-chunk schedules
# ---------------------------------------------------------------------------------------------------


def _linear(name: str, pp: int, m: int, programs: list[list[Op]]) -> Schedule:
    return Schedule(name, pp, m, pp, tuple((r,) for r in range(pp)), (tuple((r, 0) for r in range(pp)),),
                    (0,) * m, tuple(tuple(p) for p in programs))


def one_f_one_b(pp: int, num_microbatches: int) -> Schedule:
    """1F1B: rank r runs PP-1-r warm-up forwards, then alternates F and B, then drains the backwards."""
    _check_common("1F1B", pp, num_microbatches)
    m = num_microbatches
    programs = []
    for r in range(pp):
        warm = min(pp - 1 - r, m)
        prog = [Op("F", j, 0) for j in range(warm)]
        for j in range(m - warm):
            prog += [Op("F", warm + j, 0), Op("B", j, 0)]
        prog += [Op("B", j, 0) for j in range(m - warm, m)]
        programs.append(prog)
    return _linear("1F1B", pp, m, programs)


def zb1p(pp: int, num_microbatches: int) -> Schedule:
    """ZB-H1 (Zero Bubble, Qi et al. 2024): 1F1B's order with each backward split into I and W, and rank r
    running W(j - r) after I(j): it keeps r weight-grads pending, so with its PP - r activations it never
    holds more than PP micro-batches' state, like 1F1B. Later ranks' input-grads thereby race ahead of their
    weight-grads, and the W's fill the cool-down gaps of the earlier ranks."""
    _check_common("ZB1P", pp, num_microbatches)
    m = num_microbatches
    programs = []
    for r in range(pp):
        warm = min(pp - 1 - r, m)
        order = [("F", j) for j in range(warm)]
        for j in range(m - warm):
            order += [("F", warm + j), ("I", j)]
        order += [("I", j) for j in range(m - warm, m)]
        prog, done_i, next_w = [], 0, 0
        for kind, j in order:
            prog.append(Op(kind, j, 0))
            if kind == "I":
                done_i += 1
                if done_i - next_w > r:  # keep r weight-grads pending
                    prog.append(Op("W", next_w, 0))
                    next_w += 1
        prog += [Op("W", j, 0) for j in range(next_w, m)]
        programs.append(prog)
    return _linear("ZB1P", pp, m, programs)


# ---------------------------------------------------------------------------------------------------
# DualPipe and DualPipeV: the eight phases of the public implementation, written as op lists
# ---------------------------------------------------------------------------------------------------


class _Builder:
    """Emits ops for one rank, numbering micro-batches per chunk and keeping the FIFO of deferred W's."""

    def __init__(self, mbs: tuple[list[int], list[int]]):
        self.mbs = mbs
        self.f_next = [0, 0]
        self.b_next = [0, 0]
        self.pending_w: list[tuple[int, int]] = []
        self.prog: list[Op] = []

    def _take_f(self, c: int) -> tuple[int, int]:
        mb = self.mbs[c][self.f_next[c]]
        self.f_next[c] += 1
        return mb, c

    def _take_b(self, c: int, zb: bool) -> tuple[int, int]:
        mb = self.mbs[c][self.b_next[c]]
        self.b_next[c] += 1
        if zb:
            self.pending_w.append((mb, c))
        return mb, c

    def f(self, c: int) -> None:
        self.prog.append(Op("F", *self._take_f(c)))

    def b(self, c: int, zb: bool = False) -> None:
        self.prog.append(Op("I" if zb else "B", *self._take_b(c, zb)))

    def w(self) -> None:
        self.prog.append(Op("W", *self.pending_w.pop(0)))

    def fb(self, fc: int, bc: int) -> None:
        f = self._take_f(fc)
        self.prog.append(fb(f, self._take_b(bc, False)))


def _dual_program(near: int, n_half: int, h: int, per_chunk: int, mbs: tuple[list[int], list[int]]) -> list[Op]:
    """One rank's op list. ``near``: the chunk in which this rank is h stages from the input; ``far``: the
    other. ``n_half``: PP/2 for DualPipe, N for DualPipeV; ``per_chunk``: micro-batches through each chunk
    (M/2 for DualPipe, M for DualPipeV). The middle rank (h = n_half-1, where the two halves meet) runs the
    first F/B of the main phase un-overlapped, as the public implementation does, to shorten the bubble."""
    far, middle = 1 - near, h == n_half - 1
    k = _Builder(mbs)
    # Phase names are the public code's, where chunk "0" is near and "1" is far.
    for _ in range((n_half - h - 1) * 2):  # 1: nF0
        k.f(near)
    for _ in range(h + 1):  # 2: nF0F1
        k.f(near)
        k.f(far)
    for _ in range(n_half - h - 1):  # 3: nB1W1F1, zero-bubble split
        k.b(far, zb=True)
        k.w()
        k.f(far)
    for i in range(per_chunk - 2 * n_half + h + 1):  # 4 (main): nF0B1F1B0
        if i == 0 and middle:
            k.f(near)
            k.b(far)
        else:
            k.fb(near, far)
        k.fb(far, near)
    for _ in range(n_half - h - 1):  # 5: nB1F1B0
        k.b(far)
        k.fb(far, near)
    zb = False
    for i in range(h + 1):  # 6: nB1B0, the second half of these defer W
        if i == (h + 1) // 2 and h % 2 == 1:
            zb = True
        k.b(far, zb)
        if i == (h + 1) // 2 and h % 2 == 0:
            zb = True
        k.b(near, zb)
    for _ in range(n_half - h - 1):  # 7: nWB0, zero-bubble split
        k.w()
        k.b(near, zb=True)
    for _ in range(h + 1):  # 8: nW
        k.w()
    assert not k.pending_w and k.f_next == k.b_next == [len(mbs[0]), len(mbs[1])]
    return k.prog


def dualpipe(pp: int, num_microbatches: int) -> Schedule:
    """DualPipe (DeepSeek-V3): rank r holds stages r (chunk 0) and PP-1-r (chunk 1). Micro-batches
    0..M/2-1 flow rank 0 -> PP-1 through chunk 0, M/2..M-1 flow rank PP-1 -> 0 through chunk 1."""
    _check_dualpipe(pp, num_microbatches)
    m, half = num_microbatches, pp // 2
    mbs = (list(range(m // 2)), list(range(m // 2, m)))
    programs = []
    for r in range(pp):
        h = min(r, pp - 1 - r)
        near = 0 if r < half else 1  # the direction in which rank r is early in the pipeline
        programs.append(_dual_program(near, half, h, m // 2, mbs))
    placement = tuple((r, pp - 1 - r) for r in range(pp))
    route = (tuple((s, 0) for s in range(pp)), tuple((pp - 1 - s, 1) for s in range(pp)))
    direction = (0,) * (m // 2) + (1,) * (m // 2)
    return Schedule("DualPipe", pp, m, pp, placement, route, direction, tuple(tuple(p) for p in programs))


def dualpipev(pp: int, num_microbatches: int) -> Schedule:
    """DualPipeV on ``pp`` ranks and 2*pp stages: rank r holds stages r (chunk 0) and 2*pp-1-r (chunk 1).
    Every micro-batch enters at rank 0, turns at rank pp-1 and ends (loss) on rank 0."""
    _check_dualpipev(pp, num_microbatches)
    m = num_microbatches
    mbs = (list(range(m)), list(range(m)))
    programs = [_dual_program(0, pp, r, m, mbs) for r in range(pp)]
    placement = tuple((r, 2 * pp - 1 - r) for r in range(pp))
    route = (tuple((s, 0) for s in range(pp)) + tuple((pp - 1 - s, 1) for s in range(pp)),)
    return Schedule("DualPipeV", pp, m, 2 * pp, placement, route, (0,) * m, tuple(tuple(p) for p in programs))


def forward_only(schedule: Schedule) -> Schedule:
    """The forwards of ``schedule`` alone, for evaluation: the same placement, routes and directions, each
    rank running F for every (micro-batch, chunk) on its path and nothing else.

    A rank orders its forwards by (i + s, s, mb), i the micro-batch's place among those of its direction and
    s the stage: the step at which it would reach that stage in a filled pipeline. Every message goes from a
    smaller key to a larger one and every rank runs its ops in key order, so no rank can wait on one that
    waits on it (the same order on EP peers keeps their all-to-alls matched)."""
    place = {}
    for d in set(schedule.direction):
        for i, mb in enumerate(mb for mb, dm in enumerate(schedule.direction) if dm == d):
            place[mb] = i
    programs = []
    for rank, stages in enumerate(schedule.placement):
        keys = sorted((place[mb] + s, s, mb, c) for c, s in enumerate(stages)
                      for mb in schedule.microbatches_of(rank, c))
        programs.append(tuple(Op("F", mb, c) for _, _, mb, c in keys))
    return replace(schedule, name=f"{schedule.name} forward-only", programs=tuple(programs))


SCHEDULES = {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}


def build_schedule(name: str, pp: int, num_microbatches: int) -> Schedule:
    """A schedule by name (1f1b, zb1p, dualpipe, dualpipev)."""
    try:
        fn = SCHEDULES[name.lower()]
    except KeyError:
        raise ConfigError(f"pipeline schedule must be one of {sorted(SCHEDULES)}, got {name!r}") from None
    return fn(pp, num_microbatches)
