"""bench.py balance trains its variants one after another or ``--jobs`` at a time in separate processes; the
numbers must not depend on which, and a run stopped part-way keeps the variants it finished."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from benchmarks import balance  # noqa: E402
from moelib import ModelConfig  # noqa: E402
from moelib.model.transformer import build_model  # noqa: E402
from moelib.train.metrics import collect_load  # noqa: E402


def args_for(out: Path, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    balance.add_args(p)
    args = p.parse_args(["--steps", "3", "--batch", "2", "--seq", "32", "--last", "2", "--val-batches", "2",
                         "--gamma", "1e-2", "--aux-alphas", "1e-2", *extra])
    args.out, args.command = out, "balance"
    return args


def without_times(result: dict) -> dict:
    return {name: {k: v for k, v in r.items() if k != "seconds"} for name, r in result["runs"].items()}


@pytest.mark.slow
def test_parallel_variants_equal_sequential(tmp_path, one_thread):
    one = balance.run(args_for(tmp_path / "one.json"))
    two = balance.run(args_for(tmp_path / "two.json", "--jobs", "2"))
    assert list(one["runs"]) == list(two["runs"]) == ["loss-free", "aux-loss a=0.01", "none"]
    assert without_times(one) == without_times(two)
    assert one["max_vio_global_ratio_aux_over_free"] == two["max_vio_global_ratio_aux_over_free"]
    assert not list(tmp_path.glob("*.partial.json"))  # finished runs leave only their result


@pytest.mark.slow
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


@pytest.mark.parametrize("option, value, message", [
    ("--jobs", "0", "--jobs: must be at least 1, got 0"),
    ("--val-batches", "1", "--val-batches: must be at least 2, got 1"),
    ("--last", "0", "--last: must be at least 1, got 0"),
])
def test_counts_below_their_minimum_are_refused(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit):
        args_for(tmp_path / "r.json", option, value)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("concentration", [None, 30.0])  # multinomial batches; overdispersed ones (topics)
@pytest.mark.slow
def test_sampling_floor_matches_the_maxvio_of_balanced_sampling(concentration):
    """The floor estimated from one set of batches is the MaxVio_global that pooling such batches of a
    balanced router gives on average (simulated here), including when batches vary more than a multinomial."""
    rng = np.random.default_rng(0)
    experts, batches, picks, sets = 16, 32, 1024, 200
    probs = (rng.dirichlet(np.full(experts, concentration), size=(sets, batches)) if concentration
             else np.full((sets, batches, experts), 1 / experts))
    counts = torch.from_numpy(np.stack([[rng.multinomial(picks, p) for p in s] for s in probs])).double()
    truth = np.mean([balance.global_max_vio({"layer": c}) for c in counts])
    floor = np.mean([balance.sampling_floor({"layer": c}, draws=500) for c in counts])
    assert floor == pytest.approx(truth, rel=0.1)
    fewer = np.mean([balance.sampling_floor({"layer": c[: batches // 4]}, draws=500) for c in counts])
    assert fewer == pytest.approx(2 * floor, rel=0.15)  # 1/sqrt(batches)


def test_routed_counts_pool_to_the_trainers_load_and_skip_the_mtp_layer(one_thread):
    cfg = ModelConfig.from_preset("tiny")
    model = build_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(cfg.vocab_size, (2, 32), generator=gen),) * 2 for _ in range(3)]
    counts, losses = balance.routed_counts(model, batches)
    assert len(losses) == 3 and all(np.isfinite(losses))
    mtp = [name for name in model.moe_layers() if name.startswith("mtp")]
    assert mtp and not set(mtp) & set(counts) and len(counts) == len(model.moe_layers()) - len(mtp)
    assert all(c.shape == (3, cfg.n_routed_experts) for c in counts.values())
    with torch.no_grad():
        for tokens, labels in batches:
            model.compute_loss(tokens, labels, mtp_weight=0.0)
    assert balance.global_max_vio(counts) == collect_load(model).mean_max_vio
