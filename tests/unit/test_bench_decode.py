"""bench.py decode at toy sizes: every figure is produced, and the cache and memory ones are exact."""

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from benchmarks import decode  # noqa: E402


def test_decode_bench_reports_speed_cache_acceptance_and_fp8_bytes(one_thread, capsys, tmp_path):
    pytest.importorskip("transformers")
    args = argparse.Namespace(load=None, preset="tiny", dtype="bf16", batches="1,2", prompt_len=8, new=4, repeats=1,
                              threads=torch.get_num_threads(), no_hf=False, compile=False, command="decode",
                              out=tmp_path / "d.json")
    r = decode.run(args)
    assert [row["batch"] for row in r["rows"]] == [1, 2]
    for row in r["rows"]:
        assert row["moelib_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0 and row["cpu_speedup"] > 0
        assert row["moelib_cache_bytes_per_token"] == 4 * (64 + 16) * 2  # tiny: 4 layers, bf16
        assert row["hf_cache_bytes_per_token"] > 0
    assert 0 <= r["rows"][0]["acceptance_rate"] <= 1 and r["rows"][0]["speculative_tokens_per_s"] > 0
    fp8 = r["resident"]
    assert 0.5 < fp8["quantised_weights_ratio"] <= 0.55 and fp8["ratio"] < 0.6 and 0.5 < fp8["v3_671b_ratio"] < 0.502
    for cost in r["fp8_cost"].values():  # embedding in bf16 and in FP8
        assert 0 < cost["max_rel_logit_error"] < 0.5 and 0 <= cost["greedy_agreement"] <= 1
    assert r["v3_671b_cache"]["mla_bytes"] == 61 * 576 * 2  # 70 KB a token, as the V3 report says
    assert "CPU-time speed-up" in capsys.readouterr().out and (tmp_path / "d.png").stat().st_size > 0
