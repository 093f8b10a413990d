"""The tokenizer travels with the model: save_checkpoint stores it, the HF export holds it, and
transformers' AutoTokenizer loads the export with moelib's ids and round-trips any text."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moelib import ModelConfig
from moelib.convert import export_hf, import_hf
from moelib.model import build_model
from moelib.train.checkpoint import save_checkpoint
from moelib.train.tokenizer import EOD_TOKEN, train_bpe

transformers = pytest.importorskip("transformers", reason="transformers is needed for the interop tests")

CFG = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16,
           n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=8,
           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_attention_heads=2)
CORPUS = [f"The {i}th line of the corpus says: déjà vu, {i * 7} times.\n" for i in range(300)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tokexport")
    tok = train_bpe(CORPUS, 320, save_path=tmp / "trained.json")
    cfg = ModelConfig.from_preset("tiny", **CFG)
    step = save_checkpoint(tmp / "ck", build_model(cfg, "fp32", seed=0).state_dict(), cfg, 2,
                           tokenizer=tmp / "trained.json")
    hf = export_hf(tmp / "ck", tmp / "hf", "fp32")
    return tok, step, hf, transformers.AutoTokenizer.from_pretrained(str(hf))


def test_checkpoint_and_export_hold_the_tokenizer(exported, tmp_path):
    tok, step, hf, auto = exported
    for d in (step, hf, import_hf(hf, tmp_path / "back")):
        assert json.loads((d / "tokenizer.json").read_text()) == json.loads(tok.hf.to_str())
        assert json.loads((d / "tokenizer_config.json").read_text())["eos_token"] == EOD_TOKEN
    assert auto.eos_token == auto.bos_token == auto.pad_token == EOD_TOKEN and auto.eos_token_id == tok.eod
    assert auto.model_max_length == ModelConfig.from_preset("tiny", **CFG).max_position_embeddings


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=200), st.sampled_from(CORPUS)))
def test_auto_tokenizer_round_trips_with_moelib_ids(exported, text):
    tok, _, _, auto = exported
    ids = auto(text)["input_ids"]
    assert ids == tok.encode(text)
    assert auto.decode(ids) == text
