"""bench.py train-step --profile: where a step's time goes, as shares of the profiled self CPU time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_profile_lists_the_top_operators(tmp_path):
    out = tmp_path / "ts.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "train-step", "--preset", "tiny",
                           "--dtype", "bf16", "--batch", "2", "--seq", "64", "--steps", "1", "--warmup", "0",
                           "--profile", "1", "--moments", "bf16", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(out.read_text())["moelib_moments"] == "bf16" and "moelib moments=bf16" in proc.stdout
    rows = json.loads(out.read_text())["profile"]["moelib"]
    assert len(rows) == 12 and [r["share"] for r in rows] == sorted((r["share"] for r in rows), reverse=True)
    assert 0 < sum(r["share"] for r in rows) <= 1 + 1e-9
    assert "aten::mm" in {r["op"] for r in rows}  # a training step is mostly matmuls
    assert "top operators by self CPU time" in proc.stdout


@pytest.mark.slow
def test_vs_hf_reports_the_ratio_of_each_step_pair(tmp_path):
    out = tmp_path / "ts.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "train-step", "--vs-hf", "--preset",
                           "tiny", "--dtype", "bf16", "--batch", "2", "--seq", "32", "--steps", "3", "--warmup", "0",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    ours, theirs = r["models"]["moelib"]["steps_s"], r["models"]["transformers"]["steps_s"]
    assert r["paired_ratios"] == [b / a for a, b in zip(ours, theirs)] and len(r["paired_ratios"]) == 3
    assert r["paired_ratio_median"] == sorted(r["paired_ratios"])[1]
    assert "per-step pairs" in proc.stdout
