"""Distributed tests start mpirun; the helpers live in tests/distributed/_mpi.py (importable as ``_mpi``)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mpi import run_mpi  # noqa: E402


@pytest.fixture
def mpirun():
    """``mpirun(n, script, *args, timeout=...) -> (rc, stdout, stderr)``; skips when mpirun is missing."""
    return run_mpi
