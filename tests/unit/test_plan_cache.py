"""The activation measurement is cached on disk: measured once per model, backend, recompute mode, sequence
length and moelib source; a corrupt entry or a code change measures again."""

from __future__ import annotations

import pytest

from moelib.config import ModelConfig
from moelib.plan import cache

CFG = ModelConfig.from_preset("tiny")


@pytest.fixture
def counted(monkeypatch, tmp_path):
    calls = []

    def measure(cfg, backend, recompute, seq):
        calls.append((backend, recompute, seq))
        return {"dense": 100.0 + len(calls), "moe": 200.0}

    monkeypatch.setenv("MOELIB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cache, "layer_bytes_per_token", measure)
    return calls


def test_a_second_plan_reads_the_measurement_from_disk(counted):
    first = cache.activation_bytes(CFG, "bf16", "selective", 128)
    assert cache.activation_bytes(CFG, "bf16", "selective", 128) == first == {"dense": 101.0, "moe": 200.0}
    assert len(counted) == 1
    cache.activation_bytes(CFG, "bf16", "full", 128)  # another key is measured
    cache.activation_bytes(ModelConfig.from_preset("tiny", hidden_size=128), "bf16", "selective", 128)
    assert len(counted) == 3


def test_a_code_change_or_a_corrupt_entry_measures_again(counted, monkeypatch, tmp_path):
    cache.activation_bytes(CFG, "bf16", "selective", 128)
    (entry,) = (tmp_path / "plan").iterdir()
    entry.write_text("{not json")
    assert cache.activation_bytes(CFG, "bf16", "selective", 128)["dense"] == 102.0
    monkeypatch.setattr(cache, "code_digest", lambda: "another moelib")
    assert cache.activation_bytes(CFG, "bf16", "selective", 128)["dense"] == 103.0
    assert len(counted) == 3


def test_an_unwritable_cache_only_costs_speed(counted, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MOELIB_CACHE_DIR", str(blocker))  # a file where the directory should be
    assert cache.activation_bytes(CFG, "bf16", "none", 64) == {"dense": 101.0, "moe": 200.0}
