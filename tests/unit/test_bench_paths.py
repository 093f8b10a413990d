"""Every bench subcommand names its default result file the same way, from one helper."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from benchmarks import RESULTS, result_path  # noqa: E402


def test_default_and_explicit_result_paths(tmp_path):
    today = datetime.date.today().isoformat()
    assert RESULTS == ROOT / "benchmarks" / "results"
    args = argparse.Namespace(out=None, command="balance")
    assert result_path(args, "tiny") == RESULTS / f"balance-tiny-{today}.json"
    assert result_path(args) == RESULTS / f"balance-{today}.json"
    args.out = str(tmp_path / "x.json")
    assert result_path(args, "tiny") == tmp_path / "x.json"
