"""Which model a run trains: the YAML's, or (with --load and no --config, or --use-checkpoint-args) the
checkpoint's; a --config naming another model is refused by field."""

import pytest

from moelib import ModelConfig
from moelib.errors import CheckpointError, ConfigError
from moelib.model import build_model
from moelib.train.checkpoint import save_checkpoint
from moelib.train.checkpoint_model import resolve_model_config


@pytest.fixture()
def stored(tmp_path):
    cfg = ModelConfig.from_preset("tiny", vocab_size=128, hidden_size=64, num_hidden_layers=2)
    save_checkpoint(tmp_path / "ck", build_model(cfg, "fp32", device="meta").to_empty(device="cpu").state_dict(),
                    cfg, 5)
    return cfg, str(tmp_path / "ck")


def test_without_load_the_yaml_model_is_trained():
    tiny = ModelConfig.from_preset("tiny")
    assert resolve_model_config(tiny, None, None) is tiny
    with pytest.raises(ConfigError, match="--use-checkpoint-args takes the model config from --load"):
        resolve_model_config(tiny, "tiny", None, use_checkpoint_args=True)


def test_load_without_config_trains_the_checkpoint_model(stored):
    cfg, load = stored
    tiny = ModelConfig.from_preset("tiny")
    assert resolve_model_config(tiny, None, load) == cfg
    assert resolve_model_config(tiny, "tiny", load, use_checkpoint_args=True) == cfg
    assert resolve_model_config(cfg, "mine.yaml", load) is cfg  # the same model: fine


def test_a_config_of_another_model_is_refused_by_field(stored):
    cfg, load = stored
    with pytest.raises(ConfigError, match=r"differs from --config tiny \(vocab_size 128 there, 4096 here\); "
                                          "leave out --config or pass --use-checkpoint-args"):
        resolve_model_config(ModelConfig.from_preset("tiny"), "tiny", load)


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nothing")):
        resolve_model_config(ModelConfig.from_preset("tiny"), None, str(tmp_path / "nothing"))
