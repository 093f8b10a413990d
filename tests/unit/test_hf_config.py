"""config.json as it occurs: the release's and transformers 5's spellings read alike, unknown fields are ignored
with a note, and a field that changes the math in a way moelib cannot represent is refused by name."""

import logging

import pytest

from moelib import ModelConfig, YarnConfig
from moelib.errors import ConfigError
from moelib.train.hf_format import from_hf_config, to_hf_config

CFG = ModelConfig.from_preset("tiny", rope_theta=5000.0, max_position_embeddings=256,
                              rope_scaling=YarnConfig(factor=4.0, original_max_position_embeddings=64, mscale=0.9,
                                                      mscale_all_dim=0.8))


def release_spelling() -> dict:
    hf = to_hf_config(CFG, "bfloat16")
    assert "rope_theta" in hf and "rope_scaling" in hf and "torch_dtype" in hf
    return hf


def transformers5_spelling() -> dict:
    hf = release_spelling()
    rope = hf.pop("rope_scaling")
    del rope["type"]
    hf["rope_parameters"] = {**rope, "rope_theta": hf.pop("rope_theta")}
    hf["dtype"] = hf.pop("torch_dtype")
    hf.update(head_dim=16, qk_head_dim=48, use_cache=True, transformers_version="5.25.0")
    return hf


def test_both_spellings_give_the_same_model(caplog):
    with caplog.at_level(logging.WARNING, logger="moelib"):
        assert from_hf_config(release_spelling()) == CFG
        assert from_hf_config(transformers5_spelling()) == CFG
    assert not caplog.records  # nothing unknown in either


def test_rope_theta_inside_default_rope_parameters_is_read():
    hf = {**release_spelling(), "rope_scaling": None}
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0}
    cfg = from_hf_config(hf)
    assert cfg.rope_theta == 123.0 and cfg.rope_scaling is None


def test_fp8_release_quantization_config_is_accepted():
    hf = {**release_spelling(), "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                         "quant_method": "fp8", "weight_block_size": [128, 128]}}
    assert from_hf_config(hf) == CFG


def test_unknown_fields_are_ignored_with_a_note(caplog):
    with caplog.at_level(logging.WARNING, logger="moelib"):
        assert from_hf_config({**release_spelling(), "zz_custom": 1, "my_flag": True}, "x/config.json") == CFG
    notes = [r.getMessage() for r in caplog.records]
    assert notes == ["x/config.json: ignoring field(s) moelib does not know: my_flag, zz_custom"]


@pytest.mark.parametrize("field, value", [
    ("attention_bias", True), ("mlp_bias", True), ("tie_word_embeddings", True), ("num_key_value_heads", 1),
    ("hidden_act", "gelu"), ("moe_layer_freq", 2), ("rope_interleave", False),
    ("quantization_config", {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]}),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}),
])
def test_unrepresentable_field_is_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=rf"^x/config.json: {field} is .*, which moelib cannot represent: "):
        from_hf_config({**release_spelling(), field: value}, "x/config.json")


@pytest.mark.parametrize("change, says", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear' is not supported"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                       "attention_factor": 1.3}}, "rope field 'attention_factor' changes YaRN"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": False}},
     "rope field 'truncate' changes YaRN"),
    ({"topk_method": "greedy"}, "topk_method 'greedy' is not how deepseek_v3 routes"),
    ({"scoring_func": "softmax"}, "scoring_func 'softmax' is not what deepseek_v3 computes"),
    ({"model_type": "deepseek_v2", "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": True},
     "norm_topk_prob is True, which moelib cannot represent"),
    ({"model_type": "deepseek_v2", "topk_method": "noaux_tc", "norm_topk_prob": False},
     "topk_method 'noaux_tc' is not how deepseek_v2"),
    ({"model_type": "mixtral"}, "model_type is 'mixtral', expected 'deepseek_v3' or 'deepseek_v2'"),
])
def test_other_math_is_refused_in_one_sentence(change, says):
    with pytest.raises(ConfigError, match=says):
        from_hf_config({**release_spelling(), **change})


def test_v2_routing_exports_as_deepseek_v2_and_reads_back():
    v2 = ModelConfig.from_preset("v2-lite-16b", num_hidden_layers=2, vocab_size=256)
    hf = to_hf_config(v2)
    assert hf["model_type"] == "deepseek_v2" and hf["architectures"] == ["DeepseekV2ForCausalLM"]
    assert "num_nextn_predict_layers" not in hf and "rope_interleave" not in hf
    assert from_hf_config(hf) == v2
    with pytest.raises(ConfigError, match="ModelConfig.num_nextn_predict_layers: the deepseek_v2 format has no MTP"):
        to_hf_config(ModelConfig.from_dict({**v2.to_dict(), "num_nextn_predict_layers": 1}))
