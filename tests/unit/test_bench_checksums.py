"""bench.py checksums: runs on a preset and records save/load times with and without verification."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_checksums_bench_records_both_variants(tmp_path):
    out = tmp_path / "c.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "checksums", "--preset", "tiny",
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(out.read_text())
    assert set(r["seconds"]) == {"save", "save_unverified", "load", "load_unverified", "checksums_alone"}
    assert all(t > 0 for t in r["seconds"].values()) and 0.05 < r["checkpoint_gb"] < 0.2
    assert r["load_ratio"] == r["seconds"]["load"] / r["seconds"]["load_unverified"]
