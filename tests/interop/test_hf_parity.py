"""moelib against transformers' DeepseekV3ForCausalLM loaded from the same weights in the released layout."""

import json

import pytest
import torch
from safetensors.torch import save_file

from moelib import ModelConfig, YarnConfig
from moelib.model import build_model
from moelib.train.hf_format import from_hf_state_dict, to_hf_config, to_hf_state_dict

transformers = pytest.importorskip("transformers", reason="transformers is needed for the parity tests")
from _weights import randomize  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.modeling_layers import MtpModel  # noqa: E402

BASE = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
            n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, q_lora_rank=32, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, init_std=0.05, max_position_embeddings=256)

CONFIGS = {
    "qlora-groups-yarn": dict(rope_scaling=YarnConfig(factor=4.0, original_max_position_embeddings=32)),
    "plain-q-one-group": dict(q_lora_rank=None, n_group=1, topk_group=1, num_attention_heads=2),
    "8-groups-2-shared-all-moe": dict(n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=4,
                                      n_shared_experts=2, first_k_dense_replace=0, routed_scaling_factor=1.7),
    "yarn-mscale-differs": dict(rope_scaling=YarnConfig(factor=8.0, original_max_position_embeddings=16,
                                                        mscale=0.8, mscale_all_dim=0.6), rope_theta=5000.0),
    "all-dense-no-mtp": dict(first_k_dense_replace=3, num_nextn_predict_layers=0),
}


def write_hf_dir(model, cfg, path) -> None:
    tensors = {k: v.contiguous().clone() for k, v in to_hf_state_dict(model.state_dict(), cfg)}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(to_hf_config(cfg, "float32")))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def make_pair(name, tmp_path):
    cfg = ModelConfig.from_preset("tiny", **{**BASE, **CONFIGS[name]})
    model = build_model(cfg, "fp32", seed=0).eval()
    randomize(model, seed=1)
    write_hf_dir(model, cfg, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    return cfg, model, hf, tmp_path


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    cfg, model, hf, _ = make_pair(name, tmp_path)
    tokens = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.shape == theirs.shape == (3, 40, cfg.vocab_size)
    assert rel_err(ours, theirs) <= 1e-5
    # The router biases really steer selection: scaling them up changes the logits.
    if model.moe_layers():
        for moe in model.moe_layers().values():
            moe.gate.e_score_correction_bias.mul_(30)
        with torch.no_grad():
            assert rel_err(model(tokens), theirs) > 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_state_dict_round_trip(name, tmp_path):
    cfg, model, hf, _ = make_pair(name, tmp_path)
    sd = model.state_dict()
    back = from_hf_state_dict(dict(to_hf_state_dict(sd, cfg)), cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("name", [n for n in sorted(CONFIGS) if CONFIGS[n].get("num_nextn_predict_layers", 1)])
def test_mtp_matches_transformers_mtp_model(name, tmp_path):
    cfg, model, hf, _ = make_pair(name, tmp_path)
    # transformers only looks for MTP weights at layer 61 (V3's); point it at this model's MTP layer.
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.num_hidden_layers}\..*"]
    mtp = MtpModel.from_pretrained(hf).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
    seq = tokens.shape[1] - 1
    with torch.no_grad():
        main_hidden = hf(tokens, output_hidden_states=True).hidden_states[-1][:, :seq]
        theirs = mtp._project_to_logits(
            mtp.forward_layer(0, main_hidden, torch.arange(seq)[None], None, input_ids=tokens[:, 1:]))
        cos, sin = model.rope(seq, tokens.device)
        h = model.mtp[0](model.hidden_states(tokens)[:, :seq], model.embed_tokens(tokens[:, 1:]), cos, sin)
        ours = model.lm_head(h)
    assert rel_err(ours, theirs) <= 1e-5
