"""bench.py balance trains its variants one after another or ``--jobs`` at a time in separate processes; the
numbers must not depend on which, and a run stopped part-way keeps the variants it finished."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from benchmarks import balance  # noqa: E402


def args_for(out: Path, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    balance.add_args(p)
    args = p.parse_args(["--steps", "3", "--batch", "2", "--seq", "32", "--last", "2", "--val-batches", "2",
                         "--gamma", "1e-2", "--aux-alphas", "1e-2", *extra])
    args.out, args.command = out, "balance"
    return args


def without_times(result: dict) -> dict:
    return {name: {k: v for k, v in r.items() if k != "seconds"} for name, r in result["runs"].items()}


def test_parallel_variants_equal_sequential(tmp_path, one_thread):
    one = balance.run(args_for(tmp_path / "one.json"))
    two = balance.run(args_for(tmp_path / "two.json", "--jobs", "2"))
    assert list(one["runs"]) == list(two["runs"]) == ["loss-free", "aux-loss a=0.01", "none"]
    assert without_times(one) == without_times(two)
    assert one["max_vio_global_ratio_aux_over_free"] == two["max_vio_global_ratio_aux_over_free"]
    assert not list(tmp_path.glob("*.partial.json"))  # finished runs leave only their result


def test_stopped_run_keeps_finished_variants(tmp_path, monkeypatch):
    train = balance.train

    def stop_at_aux(cfg, gamma, args, name, position=0):
        if name.startswith("aux-loss"):
            raise KeyboardInterrupt
        return train(cfg, gamma, args, name, position)

    monkeypatch.setattr(balance, "train", stop_at_aux)
    with pytest.raises(KeyboardInterrupt):
        balance.run(args_for(tmp_path / "r.json"))
    kept = json.loads((tmp_path / "r.partial.json").read_text())
    assert list(kept["runs"]) == ["loss-free"] and len(kept["runs"]["loss-free"]["max_vio"]) == 3
    assert kept["args"]["steps"] == 3


def test_jobs_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        args_for(tmp_path / "r.json", "--jobs", "0")
    assert "--jobs: must be at least 1, got 0" in capsys.readouterr().err
