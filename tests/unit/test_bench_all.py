"""bench.py all --dry-run lists the commands and measures nothing, so it must not write a summary over the
last real one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "all.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "all", "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not out.exists()
    commands = [line for line in proc.stdout.splitlines() if line.startswith("python tools/bench.py ")]
    assert any(c.startswith("python tools/bench.py balance ") and c.endswith("--jobs 2") for c in commands), commands
    assert "results:" not in proc.stdout
