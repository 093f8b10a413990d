"""moelib.parallel.init under each launcher: mpirun, torchrun, and a plain single process."""

import json
import re
import socket
import sys
import time
from pathlib import Path

import pytest
from _mpi import REPO, WORKERS, run, run_mpi, worker_env


def rows(out: str) -> list[dict]:
    # torchrun may glue its ranks' lines together; each record is one flat JSON object.
    return sorted((json.loads(m) for m in re.findall(r"\{[^{}]*\}", out)), key=lambda r: r["rank"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_mpirun():
    rc, out, err = run_mpi(3, "launch_info.py", timeout=120)
    assert rc == 0, err
    got = [(r["launcher"], r["rank"], r["world"], r["local"]) for r in rows(out)]
    assert got == [("mpi", i, 3, i) for i in range(3)]
    assert all(r["rank_sum"] == 3.0 for r in rows(out))


@pytest.mark.dist
def test_torchrun_variables_are_honoured():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(WORKERS / "launch_info.py")]
    rc, out, err = run(cmd, 120, worker_env())
    assert rc == 0, err[-2000:]
    assert [(r["launcher"], r["rank"], r["world"]) for r in rows(out)] == [("torchrun", 0, 2), ("torchrun", 1, 2)]


def test_single_process():
    rc, out, err = run([sys.executable, str(WORKERS / "launch_info.py")], 60, worker_env())
    assert rc == 0, err
    assert rows(out) == [{"launcher": "single", "rank": 0, "world": 1, "local": 0, "rank_sum": 0.0}]
    assert REPO.exists()


@pytest.mark.parametrize("message,runs", [("The PMIx server's listener thread failed to start. We cannot", 2),
                                          ("rank 1 raised ValueError", 1)])
def test_only_a_launcher_start_failure_is_retried(tmp_path, message, runs):
    """The helper starts a job again only when OpenMPI failed to start it; a job that ran and failed is not."""
    script = tmp_path / "flaky.py"
    script.write_text(f"import pathlib, sys\nstarts = pathlib.Path({str(tmp_path / 'starts')!r})\n"
                      "starts.write_text(starts.read_text() + 'x' if starts.exists() else 'x')\n"
                      f"if len(starts.read_text()) == 1:\n    sys.stderr.write({message!r})\n    sys.exit(213)\n")
    rc, _, err = run([sys.executable, str(script)], 60)
    assert len((tmp_path / "starts").read_text()) == runs
    assert (rc == 0) == (runs == 2) and (rc == 213) == (runs == 1)


def test_a_timeout_kills_ranks_outside_the_launchers_process_group(tmp_path):
    """OpenMPI puts every rank in a process group of its own: killing mpirun's group alone would leave them
    running (eating the cores of every later test) and holding the output pipes, so the helper would wait
    for them: here 60 s instead of the 3 s timeout."""
    marker = tmp_path / "started"
    began = time.monotonic()
    rc, _, err = run(["bash", "-c", f"setsid sleep 60 & echo $! > {marker}; wait"], timeout=3)
    assert rc == -9 and "timeout" in err and time.monotonic() - began < 30
    pid = int(marker.read_text())  # the child had started before the timeout
    time.sleep(0.5)
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
