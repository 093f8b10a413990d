"""bench.py fp8-vs-bf16 runs for hours over many seeds on CPU: a run stopped part-way keeps the seeds it
finished in <out>.partial.json, a finished run leaves only its result, and seeds trained ``--jobs`` at a
time give the numbers they give one after another."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from benchmarks import fp8_vs_bf16  # noqa: E402


def args_for(out: Path, seeds: list[int], *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    fp8_vs_bf16.add_args(p)
    args = p.parse_args(["--steps", "2", "--batch", "2", "--seq", "32", "--last", "2", "--log-interval", "100",
                         "--telemetry-interval", "1", "--seeds", *map(str, seeds), *extra])
    args.out, args.command = out, "fp8-vs-bf16"
    return args


@pytest.mark.slow
def test_stopped_run_keeps_finished_seeds(tmp_path, monkeypatch):
    train_pair = fp8_vs_bf16.train_pair

    def stop_at_seed_2(cfg, args, seed, *rest):
        if seed == 2:
            raise KeyboardInterrupt
        return train_pair(cfg, args, seed, *rest)

    monkeypatch.setattr(fp8_vs_bf16, "train_pair", stop_at_seed_2)
    with pytest.raises(KeyboardInterrupt):
        fp8_vs_bf16.run(args_for(tmp_path / "r.json", [1, 2]))
    kept = json.loads((tmp_path / "r.partial.json").read_text())
    assert list(kept["final_loss"]) == ["1"] and len(kept["paired_rel_diff"]["fp8-emulated"]) == 1
    assert kept["args"]["seeds"] == [1, 2]
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_finished_run_removes_partial(tmp_path):
    result = fp8_vs_bf16.run(args_for(tmp_path / "r.json", [1]))
    assert set(result["final_loss"]) == {"1"} and not (tmp_path / "r.partial.json").exists()


@pytest.mark.slow
def test_parallel_seeds_equal_sequential(tmp_path, one_thread):
    one = fp8_vs_bf16.run(args_for(tmp_path / "one.json", [3, 1, 2]))
    two = fp8_vs_bf16.run(args_for(tmp_path / "two.json", [3, 1, 2], "--jobs", "2"))
    for key in ("final_loss", "paired_rel_diff", "summary", "losses", "fp8_telemetry"):
        assert one[key] == two[key], key
    assert list(two["final_loss"]) == ["3", "1", "2"] and len(two["paired_rel_diff"]["fp8-emulated"]) == 3
    assert two["fp8_telemetry"] and all(t["numel"] > 0 for t in two["fp8_telemetry"].values())


def test_bad_arguments_fail_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        args_for(tmp_path / "r.json", [1], "--jobs", "0")
    assert "--jobs: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="repeats"):
        fp8_vs_bf16.run(args_for(tmp_path / "r.json", [1, 1]))
