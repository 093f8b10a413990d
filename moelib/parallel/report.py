"""What a failing rank tells the user under mpirun, before the job is torn down.

Every CLI's ``main`` runs through ``run_main``. A moelib error (or a file the OS refused) prints
``prog: rank N: error: <one sentence>`` (one process: ``prog: error:``) and exits 2: the user must change a
flag, file or input. A bug prints its traceback, each line prefixed with the rank, and exits 1. Both go to
the real stderr; then the whole job ends at once (MPI_Abort), because the other ranks may be waiting in a
collective for this one. Ranks that fail with the same sentence print it once, and a rank whose connection
broke because another rank ended first stays quiet: that rank's report (or mpirun's notice of a crash)
says why.

``mark(label)`` records in the job's store where this rank is (a label per phase of the program all ranks
run in the same order). When collectives time out, each waiting rank leaves a note; after a short window
one of them reports: the ranks without a note are the ones that did not arrive, named with their last label.
"""

from __future__ import annotations

import datetime
import hashlib
import sys
import time
import traceback
from collections.abc import Callable

import torch.distributed as dist

from moelib.errors import MoelibError
from moelib.parallel import launch

FAILED_KEY = "moelib/failed"  # the rank that reports the failure
LOST_PEER = ("connection closed by peer", "connection reset by peer", "broken pipe")
# mpirun relays the ranks' output asynchronously; without a pause its abort notice overtakes the report.
REPORT_DRAIN_S = 1.0
# A quiet rank waits this long for the reporting rank to end the job, then ends it itself: longer than a
# timeout report may take (its window, at most 30 s, and the drain), or it would cut that report off.
QUIET_WAIT_S = 35.0
_seq = 0
_label = "start-up"


class CollectiveTimeout(MoelibError, RuntimeError):
    """A collective waited longer than the timeout for ranks that never arrived."""


def mark(label: str) -> None:
    """Record that this rank has reached ``label`` (one store write)."""
    global _seq, _label
    _seq, _label = _seq + 1, label
    store = launch.store()
    if store is not None:
        store.set(f"moelib/at/{launch.process_rank()}", label)


def _store(seconds: float = 2.0):
    """The job's store with a short timeout (it lives on rank 0, which may be the rank that hangs)."""
    store = launch.store()
    if store is not None:
        store.set_timeout(datetime.timedelta(seconds=seconds))
    return store


def is_timeout(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and any(word in str(e).lower() for word in ("timed out", "timeout"))


def explain_timeout(e: BaseException) -> CollectiveTimeout | None:
    """The timeout ``e`` as one sentence naming the operation that waited and the ranks that did not arrive;
    None when another waiting rank reports it. Ranks that arrived later time out later: each waits until
    every rank has left a note, or for the timeout (at least 15 s, at most 30 s)."""
    rank, world = launch.process_rank(), dist.get_world_size()
    window = min(max(launch.collective_timeout(), 15.0), 30.0)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    head = f"a collective in {_label!r} timed out after {launch.collective_timeout():g} s ({first})"
    try:
        store = _store()
        store.set(f"moelib/waited/{rank}", _label)
    except Exception:  # the store on rank 0 does not answer: rank 0 is one that did not arrive
        return CollectiveTimeout(f"{head}; rank 0 did not arrive (it does not answer)")
    try:
        deadline = time.monotonic() + window
        while time.monotonic() < deadline and not store.check([f"moelib/waited/{r}" for r in range(world)]):
            time.sleep(0.2)
        if store.compare_set(FAILED_KEY, "", str(rank)).decode() != str(rank):
            return None
        missing = [r for r in range(world) if not store.check([f"moelib/waited/{r}"])]
        where = {r: store.get(f"moelib/at/{r}").decode() if store.check([f"moelib/at/{r}"]) else "start-up"
                 for r in missing}
    except Exception:  # rank 0 answered before: it has ended the job since, after its own report
        return None
    if not missing:
        return CollectiveTimeout(f"{head}; every rank was waiting")
    return CollectiveTimeout(f"{head}; rank(s) {', '.join(map(str, missing))} did not arrive (" + "; ".join(
        f"rank {r} last reached {label!r}" for r, label in where.items()) + ")")


def _note_waiting() -> None:
    """Leave this rank's note for a timeout report (see explain_timeout), if the store still answers."""
    try:
        store = _store()
        if store is not None:
            store.set(f"moelib/waited/{launch.process_rank()}", _label)
    except Exception:  # rank 0's store is gone: the job is ending anyway
        pass


def _several_ranks() -> bool:
    return (dist.is_initialized() and dist.get_world_size() > 1) or launch.started_by_mpi()


def _claim() -> None:
    """Record that this rank reports a failure, so ranks whose collectives time out later stay quiet."""
    try:
        store = _store()
        if store is not None:
            store.compare_set(FAILED_KEY, "", str(launch.process_rank()))
    except Exception:  # rank 0's store is gone: the job is ending anyway
        pass


def _first_to_say(sentence: str) -> bool:
    """Claims the report; False when another rank already reported this very sentence."""
    _claim()
    try:
        store = _store()
        if store is None:  # before the process group exists only the flags were read: every rank fails alike
            return launch.process_rank() == 0
        return store.add(f"moelib/said/{hashlib.sha1(sentence.encode()).hexdigest()}", 1) == 1
    except Exception:  # no answer from the store: better twice than never
        return True


def run_main(main: Callable[[], int], prog: str) -> int:
    """Run ``main`` and return its exit code; on an error, report it and end the whole job (see module doc)."""
    prefix = f"{prog}: rank {launch.process_rank()}: " if _several_ranks() else f"{prog}: "
    try:
        code = main()
    except KeyboardInterrupt:
        raise
    except MoelibError as e:
        _end(f"{prefix}error: {e}" if _first_to_say(str(e)) else None, 2)
    except OSError as e:
        if e.filename is None:  # a socket or pipe, not the user's file
            _report_bug(e, prefix)
        message = f"{e.filename}: {e.strerror or e}"  # unreadable input, unwritable output, full disk
        _end(f"{prefix}error: {message}" if _first_to_say(message) else None, 2)
    except Exception as e:
        _report_bug(e, prefix)
    launch.shutdown()
    return code


def _report_bug(e: Exception, prefix: str) -> None:
    """End the job after an unexpected error: quietly if a peer went away, explained if a collective timed
    out, else with the traceback."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if distributed and any(words in str(e).lower() for words in LOST_PEER):
        _note_waiting()  # it reached the collective: a timeout report must not wait for it, nor name it
        _end(None, 1)
    if distributed and is_timeout(e):
        explained = explain_timeout(e)
        _end(f"{prefix}error: {explained}" if explained else None, 1)
    if distributed:
        _claim()
    lines = traceback.format_exception(type(e), e, e.__traceback__)
    _end("".join(prefix + line for chunk in lines for line in chunk.splitlines(True)).rstrip(), 1)


def _end(text: str | None, code: int) -> None:
    """Print ``text`` (None: stay quiet) and end the job."""
    if text is not None:  # sys.__stderr__: torch's distributed excepthook may point sys.stderr at a buffer
        print(text, file=sys.__stderr__, flush=True)
        if _several_ranks():
            time.sleep(REPORT_DRAIN_S)
    elif _several_ranks():
        time.sleep(QUIET_WAIT_S)  # let the reporting rank print before anyone's MPI_Abort kills it
    if _several_ranks():
        launch.abort(code)
    launch.shutdown()
    sys.exit(code)
