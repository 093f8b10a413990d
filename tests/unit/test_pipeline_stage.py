import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib import ConfigError, ModelConfig
from moelib.model import build_model
from moelib.parallel.pipeline.stage import PipelineStage, balanced_ends, build_stage, layer_costs, split_layers
from moelib.train.metrics import model_flops_per_token


@pytest.mark.parametrize("preset, stages", [("tiny", 1), ("tiny", 2), ("tiny", 4), ("small", 3), ("v3-671b", 16)])
def test_split_covers_every_layer_once(preset, stages):
    cfg = ModelConfig.from_preset(preset)
    specs = split_layers(cfg, stages, 4096)
    assert [layer for s in specs for layer in s.layer_ids] == list(range(cfg.num_hidden_layers))
    assert all(s.layer_ids for s in specs) and specs[0].is_first and specs[-1].is_last


def brute_force_least_max(cost: list[float], parts: int) -> float:
    """The least largest run sum over every split of ``cost`` into ``parts`` non-empty contiguous runs."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(cost)), parts - 1):
        bounds = (0, *cuts, len(cost))
        best = min(best, max(sum(cost[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


@settings(max_examples=150, deadline=None)
@given(cost=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=9), data=st.data())
def test_balanced_split_minimises_the_costliest_stage(cost, data):
    parts = data.draw(st.integers(1, len(cost)))
    ends = balanced_ends(tuple(cost), parts)
    assert len(ends) == parts and ends[-1] == len(cost) and list(ends) == sorted(set(ends)) and ends[0] >= 1
    bounds = (0, *ends)
    worst = max(sum(cost[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert worst == pytest.approx(brute_force_least_max(cost, parts), rel=1e-9)


def test_v3_split_weighs_head_and_mtp_by_their_flops():
    # 61 layers on 16 stages: the head (hidden x vocab) and the MTP module (eh_proj, a MoE block and a second
    # head pass) together cost 3.9 decoder layers at 4096 tokens, so the last stage keeps one decoder layer
    # and the other 60 fill the rest four by four (counting head and MTP as one layer each gave the last
    # stage layers 59-60, 1.4x a middle stage)
    cfg = ModelConfig.from_preset("v3-671b")
    f = cfg.flops_per_token(4096)
    assert 3.8 < (f["head"] + f["mtp"]) / f["moe"] < 4.0
    specs = split_layers(cfg, 16, 4096)
    assert [len(s.layer_ids) for s in specs] == [4] * 15 + [1]
    cost = layer_costs(cfg, 4096)
    costs = [sum(cost[i] for i in s.layer_ids) for s in specs]
    assert max(costs) == pytest.approx(cost[-1])  # no split does better: the last stage holds at least a layer
    assert sum(costs) == pytest.approx(model_flops_per_token(cfg, 4096) / 3, rel=1e-12)


def test_split_is_deterministic_and_independent_of_the_call_order():
    cfg = ModelConfig.from_preset("v2-lite-16b")
    first = split_layers(cfg, 4, 4096)
    balanced_ends.cache_clear()
    assert split_layers(cfg, 4, 4096) == first


def test_too_many_stages():
    with pytest.raises(ConfigError, match="5 pipeline stages"):
        split_layers(ModelConfig.from_preset("tiny"), 5, 64)


@pytest.mark.parametrize("stages", [2, 4])
def test_chained_stages_equal_the_full_model(stages):
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=4)
    full = build_model(cfg, "fp32", seed=7)
    specs = split_layers(cfg, stages, 16)
    models = [build_stage(cfg, "fp32", s, seed=7, keep_embedding=s.is_last) for s in specs]
    reference = full.state_dict()
    names = [k for m in models for k in m.state_dict()]
    # Every tensor initialised as in the full model; only the embedding appears twice (first stage, MTP).
    assert sorted(set(names)) == sorted(reference)
    assert [n for n in names if names.count(n) > 1] == ["embed_tokens.weight"] * 2
    for m in models:
        for k, v in m.state_dict().items():
            assert torch.equal(v, reference[k]), k
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    h = tokens[:, :-1]
    for spec, m in zip(specs, models):
        h = PipelineStage(m, spec)(h, tokens[:, 1:])
    ref = full.compute_loss(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(h.loss, ref.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.mtp_losses[0], ref.mtp_losses[0], rtol=1e-6, atol=1e-6)
