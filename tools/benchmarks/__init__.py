"""Benchmark subcommands of tools/bench.py, one module each."""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def result_path(args, variant: str = "") -> Path:
    """Where a subcommand's JSON goes: ``--out``, else benchmarks/results/<command>[-<variant>]-<date>.json."""
    if args.out:
        return Path(args.out)
    return RESULTS / ("-".join(p for p in (args.command, variant, datetime.date.today().isoformat()) if p) + ".json")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int of at least ``low``; argparse names the option in the error."""
    def parse(text: str) -> int:
        n = int(text)
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        return n
    return parse


def add_jobs_arg(p: argparse.ArgumentParser, what: str) -> None:
    """``--jobs N``: runs at once, in separate processes sharing the threads (results do not depend on N)."""
    p.add_argument("--jobs", type=int_at_least(1), default=1, help=f"{what} trained at once, in separate processes "
                   "sharing the threads (each one's numbers do not depend on it)")


def write_partial(path: Path, record: dict) -> None:
    """Replace ``path`` atomically with ``record``: a long multi-run benchmark stopped before its end keeps
    the runs it finished, and a crash mid-write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _init_worker(threads: int, parent: int) -> None:
    torch.set_num_threads(threads)

    def exit_with_parent() -> None:
        # A killed benchmark cannot shut its pool down, and its workers would train on for nobody.
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def map_jobs(fn: Callable, calls: Sequence[tuple], jobs: int) -> Iterator[tuple[int, object]]:
    """Yield (i, fn(*calls[i])) as each call finishes: in order in this process when ``jobs`` <= 1, otherwise
    ``jobs`` at a time in worker processes that share this process's threads. Each call must build its own
    state from its arguments (seeded), so its result does not depend on where it ran."""
    if jobs <= 1:
        for i, call in enumerate(calls):
            yield i, fn(*call)
        return
    threads = max(1, torch.get_num_threads() // jobs)
    # spawn, not fork: a forked child would inherit the parent's OpenMP thread pool state.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads, os.getpid())) as pool:
        futures = {pool.submit(fn, *call): i for i, call in enumerate(calls)}
        for f in as_completed(futures):
            yield futures[f], f.result()
