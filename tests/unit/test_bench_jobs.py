"""--jobs workers (tools/benchmarks.map_jobs) do not outlive a benchmark that is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import os, sys, time
sys.path.insert(0, {tools!r})
from benchmarks import map_jobs

def work(i):
    open(os.path.join({out!r}, f"worker{{i}}"), "w").write(str(os.getpid()))
    time.sleep(300)

if __name__ == "__main__":
    for _ in map_jobs(work, [(0,), (1,)], 2):
        pass
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's reaping is left


@pytest.mark.slow
def test_workers_exit_when_the_benchmark_is_killed(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(SCRIPT.format(tools=str(ROOT / "tools"), out=str(tmp_path)))
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("worker*"))) < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            assert parent.poll() is None, "the benchmark exited early"
            time.sleep(0.2)
        workers = [int(p.read_text()) for p in tmp_path.glob("worker*")]
        assert all(alive(w) for w in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(w) for w in workers), "a worker outlived the killed benchmark"
    finally:
        parent.kill()
        for p in tmp_path.glob("worker*"):
            try:
                os.kill(int(p.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
