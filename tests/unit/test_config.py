import pytest

from moelib import ConfigError, ModelConfig, PrecisionConfig, TrainConfig
from moelib.model import build_model


def test_v3_671b_counts_match_the_report():
    counts = ModelConfig.from_preset("v3-671b").param_counts()
    assert abs(counts["total"] / 671.0e9 - 1) <= 0.003
    assert 36.5e9 <= counts["activated"] <= 38e9
    assert abs(counts["attention_per_layer"] / 187.1e6 - 1) < 1e-3
    assert abs(counts["dense_ffn_per_layer"] / 396.4e6 - 1) < 1e-3
    assert abs(counts["expert"] / 44.04e6 - 1) < 1e-3
    assert abs(counts["embedding"] / 0.927e9 - 1) < 1e-3
    assert 11.4e9 <= counts["mtp"] <= 11.7e9  # the report: 11.5B unique MTP parameters


def test_v2_lite_is_a_16b_model():
    cfg = ModelConfig.from_preset("v2-lite-16b")
    assert cfg.q_lora_rank is None and cfg.scoring_func == "softmax"
    assert abs(cfg.param_counts()["total"] / 15.7e9 - 1) < 0.01


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_analytic_counts_equal_allocated_parameters(preset):
    cfg = ModelConfig.from_preset(preset)
    model = build_model(cfg, "fp32", device="meta")
    counts = cfg.param_counts()
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert (main, mtp) == (counts["total"], counts["mtp"])


def test_preset_sizes():
    tiny, small = (ModelConfig.from_preset(p).param_counts() for p in ("tiny", "small"))
    assert 7e6 <= tiny["total"] + tiny["mtp"] <= 13e6
    assert 80e6 <= small["total"] <= 130e6
    t = ModelConfig.from_preset("tiny")
    assert t.n_shared_experts >= 1 and t.n_group > t.topk_group > 0 and t.num_nextn_predict_layers == 1


@pytest.mark.parametrize("overrides, field", [
    (dict(n_routed_experts=16, n_group=3), "n_group"),
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(n_group=4, topk_group=5), "topk_group"),
    (dict(n_routed_experts=16, n_group=8, topk_group=1, num_experts_per_tok=3), "topk_group"),
    (dict(hidden_size=-8), "hidden_size"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor"),
    (dict(rope_scaling=dict(factor=0.5)), "factor"),
    (dict(rope_scaling=dict(bogus=1)), "bogus"),
    (dict(not_a_field=1), "not_a_field"),
])
def test_bad_model_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"\.{field}: "):
        ModelConfig.from_preset("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        ModelConfig.from_preset("huge")


def test_config_dict_round_trip():
    cfg = ModelConfig.from_preset("v3-671b")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_train_and_precision_validation():
    with pytest.raises(ConfigError, match=r"PrecisionConfig\.backend"):
        PrecisionConfig(backend="fp4")
    with pytest.raises(ConfigError, match=r"TrainConfig\.min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ConfigError, match=r"TrainConfig\.lr_warmup_iters"):
        TrainConfig(lr_warmup_iters=-1)
    with pytest.raises(ConfigError, match=r"TrainConfig\.micro_batch_size"):
        TrainConfig.from_dict({"micro_batch_size": 0})
    assert TrainConfig.from_dict({"precision": {"backend": "fp32"}}).precision.backend == "fp32"


def test_recipe_yaml_configs(tmp_path):
    from pathlib import Path

    from moelib.config import RecipeConfig

    configs = Path(__file__).resolve().parents[2] / "recipes" / "configs"
    for name in ("tiny", "small", "v2-lite-16b", "v3-671b"):
        run = RecipeConfig.from_yaml(configs / f"{name}.yaml")
        assert run.model == ModelConfig.from_preset(name)
    v3 = RecipeConfig.from_yaml(configs / "v3-671b.yaml")
    assert (v3.parallel.pp, v3.parallel.ep, v3.parallel.pipeline_schedule) == (16, 64, "dualpipe")
    tiny = RecipeConfig.from_yaml(configs / "tiny.yaml", {"train": {"lr": 1e-3, "seed": None},
                                                        "parallel": {"expert_model_parallel_size": 2}})
    assert tiny.train.lr == 1e-3 and tiny.train.seed == 1234 and tiny.parallel.ep == 2

    bad = tmp_path / "bad.yaml"
    for text, message in [("optimizer: {}\n", "unknown section 'optimizer'"),
                          ("train: {learning_rate: 1}\n", r"TrainConfig\.learning_rate: unknown field"),
                          ("model: {preset: tiny, n_group: 3}\n", r"ModelConfig\.n_group"),
                          ("model: [1, 2\n", "not valid YAML"),
                          ("- 1\n", "expected a mapping")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            RecipeConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        RecipeConfig.from_yaml(tmp_path / "missing.yaml")
