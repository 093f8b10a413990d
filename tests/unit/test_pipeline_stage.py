import pytest
import torch

from moelib import ConfigError, ModelConfig
from moelib.model import build_model
from moelib.parallel.pipeline.stage import PipelineStage, build_stage, split_layers


@pytest.mark.parametrize("preset, stages", [("tiny", 1), ("tiny", 2), ("tiny", 4), ("small", 3), ("v3-671b", 16)])
def test_split_covers_every_layer_once(preset, stages):
    cfg = ModelConfig.from_preset(preset)
    specs = split_layers(cfg, stages)
    assert [layer for s in specs for layer in s.layer_ids] == list(range(cfg.num_hidden_layers))
    assert all(s.layer_ids for s in specs) and specs[0].is_first and specs[-1].is_last
    # Balanced in cost: the last stage also runs the head and each MTP module (one layer's worth each).
    costs = [len(s.layer_ids) + (1 + cfg.num_nextn_predict_layers) * s.is_last for s in specs]
    assert max(costs) - min(costs) <= 2


def test_too_many_stages():
    with pytest.raises(ConfigError, match="5 pipeline stages"):
        split_layers(ModelConfig.from_preset("tiny"), 5)


@pytest.mark.parametrize("stages", [2, 4])
def test_chained_stages_equal_the_full_model(stages):
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=4)
    full = build_model(cfg, "fp32", seed=7)
    specs = split_layers(cfg, stages)
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
