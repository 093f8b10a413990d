import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moelib import ConfigError, ModelConfig, PrecisionConfig, TrainConfig, YarnConfig
from moelib.config import DataConfig, ParallelConfig
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


# -- YAML as people write it --------------------------------------------------------------------------------------

def recipe_yaml(tmp_path, text: str):
    from moelib.config import RecipeConfig

    path = tmp_path / "run.yaml"
    path.write_text(text)
    return RecipeConfig.from_yaml(path)


def float_spellings(value: float) -> list[str]:
    """How people write a float in YAML: PyYAML (YAML 1.1) reads only the dotted, signed-exponent ones as floats."""
    mantissa, exponent = f"{value:e}".split("e")
    return [repr(value), f"{value:e}", f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}", f"{value:.3E}"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.floats(1e-9, 1e-1), spelling=st.integers(0, 3), iters=st.integers(1, 10**7),
       underscores=st.booleans())
def test_yaml_numbers_read_as_numbers_in_every_spelling(tmp_path, value, spelling, iters, underscores):
    text = float_spellings(value)[spelling]
    written = f"{iters:_}" if underscores else str(iters)
    run = recipe_yaml(tmp_path, f"train:\n  lr: {text}\n  min_lr: 0\n  adam_eps: {text}\n  train_iters: {written}\n")
    assert run.train.lr == float(text) == run.train.adam_eps and isinstance(run.train.lr, float)
    assert run.train.train_iters == iters and isinstance(run.train.train_iters, int)


def test_integers_written_in_exponent_form_read_as_integers(tmp_path):
    run = recipe_yaml(tmp_path, "train: {train_iters: 2e3, seed: 1e1}\nmodel: {preset: tiny, rope_theta: 1e4}\n")
    assert (run.train.train_iters, run.train.seed, run.model.rope_theta) == (2000, 10, 10000.0)


@pytest.mark.parametrize("text, message", [
    ("train: {lr: fast}\n", r"^TrainConfig\.lr: expected a number, got 'fast'$"),
    ("train: {train_iters: 2.5e1x}\n", r"^TrainConfig\.train_iters: expected a number"),
    ("train: {train_iters: 25e-1}\n", r"^TrainConfig\.train_iters: expected an integer, got '25e-1'$"),
    ("model: {preset: tiny, hidden_size: wide}\n", r"^ModelConfig\.hidden_size: expected a number"),
    ("parallel: {num_microbatches: many}\n", r"^ParallelConfig\.num_microbatches: expected a number"),
    ("train: {precision: {telemetry_interval: often}}\n", r"^PrecisionConfig\.telemetry_interval: expected a number"),
])
def test_a_non_number_is_one_line_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as e:
        recipe_yaml(tmp_path, text)
    assert "\n" not in str(e.value)


def test_precision_may_be_the_backend_name(tmp_path):
    assert recipe_yaml(tmp_path, "train: {precision: fp32}\n").train.precision == PrecisionConfig(backend="fp32")
    with pytest.raises(ConfigError, match=r"PrecisionConfig\.backend: must be one of"):
        recipe_yaml(tmp_path, "train: {precision: fp4}\n")
    with pytest.raises(ConfigError, match=r"TrainConfig\.precision: must be a backend name"):
        recipe_yaml(tmp_path, "train: {precision: 16}\n")


@pytest.mark.parametrize("cls, field, value", [
    (TrainConfig, "lr", 0.0), (TrainConfig, "lr", float("inf")), (TrainConfig, "lr", True),
    (TrainConfig, "min_lr", -1e-5), (TrainConfig, "adam_eps", 0.0), (TrainConfig, "adam_eps", -1e-8),
    (TrainConfig, "adam_beta1", 1.0), (TrainConfig, "adam_beta2", -0.1), (TrainConfig, "weight_decay", -0.1),
    (TrainConfig, "clip_grad", float("nan")), (TrainConfig, "bias_update_speed", -1.0),
    (TrainConfig, "mtp_loss_weight", -0.3), (TrainConfig, "ema_decay", 1.0), (TrainConfig, "seed", -1),
    (TrainConfig, "seed", 1.5), (TrainConfig, "lr_warmup_iters", 2.5), (TrainConfig, "log_interval", 0),
    (TrainConfig, "recompute", "some"), (TrainConfig, "moment_dtype", "fp16"),
    (PrecisionConfig, "pow2_scales", "yes"), (PrecisionConfig, "amax_history_len", 0),
    (ParallelConfig, "pipeline_model_parallel_size", 0), (ParallelConfig, "expert_model_parallel_size", 1.0),
    (ParallelConfig, "pipeline_schedule", "gpipe"), (ParallelConfig, "num_microbatches", 0),
    (ParallelConfig, "ranks_per_node", -2), (ParallelConfig, "max_nodes_per_token", 0),
    (DataConfig, "data_path", 3), (DataConfig, "tokenizer", ["a"]),
    (ModelConfig, "norm_topk_prob", "yes"), (ModelConfig, "aux_loss_alpha", -1.0),
    (ModelConfig, "rms_norm_eps", 0.0), (ModelConfig, "init_std", "small"),
    (YarnConfig, "beta_slow", 0.0), (YarnConfig, "mscale", float("nan")), (YarnConfig, "factor", 0.5),
])
def test_every_field_is_validated(cls, field, value):
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}\.{field}: "):
        cls(**{field: value})


def test_yaml_written_lr_trains(tmp_path):
    """The issue's reproducer: `lr: 3e-3` (a string to PyYAML) used to stop the recipe with a traceback."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  preset: tiny\n  num_hidden_layers: 2\ntrain:\n  lr: 3e-3\n  min_lr: 1e-5\n"
                      "  adam_eps: 1e-8\n  train_iters: 2\n  micro_batch_size: 2\n  seq_length: 32\n"
                      "  log_interval: 1\n  precision: fp32\n")
    done = subprocess.run([sys.executable, str(repo / "recipes" / "v3_pretrain.py"), "--config", str(config),
                           "--save", str(tmp_path / "ck"), "--peak-tflops", "1", "--log-json", str(tmp_path / "log")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]  # held-out rows carry valid_*/test_* keys instead
    assert [s["step"] for s in steps] == [1, 2] and all(math.isfinite(s["loss"]) for s in steps)
    assert steps[0]["lr"] <= 3e-3
    step = tmp_path / "ck" / (tmp_path / "ck" / "latest").read_text().strip()
    assert (step / "tokenizer.json").is_file() and (step / "tokenizer_config.json").is_file()  # trained-on BPE
