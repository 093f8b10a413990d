"""DeepSeek-V2 / V2-Lite (model_type deepseek_v2): a checkpoint written by transformers' DeepseekV2ForCausalLM
loads in moelib with the same logits, imports, trains on and exports back to deepseek_v2, which transformers
loads with moelib's logits; the v2-lite-16b preset is what the released V2-Lite config.json maps to."""

import json
import logging

import pytest
import torch

from moelib import ModelConfig, TrainConfig, load_model
from moelib.convert import export_hf, import_hf
from moelib.errors import CheckpointError
from moelib.model import build_model
from moelib.train.checkpoint import CheckpointReader, save_checkpoint
from moelib.train.hf_format import from_hf_config
from moelib.train.trainer import Trainer

transformers = pytest.importorskip("transformers", reason="transformers is needed for the interop tests")
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM  # noqa: E402

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=3, kv_lora_rank=16,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, n_shared_experts=2,
             max_position_embeddings=256, initializer_range=0.05)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
CASES = {
    # V2-Lite's routing and attention, with the release's spelling (rope_scaling, top-level rope_theta).
    "lite-greedy-plain-q": dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                                routed_scaling_factor=1.0, rope_scaling=dict(YARN), rope_theta=10000.0),
    # V2's: group-limited greedy over 4 groups, a query latent, a scaling factor, transformers 5's spelling.
    "v2-group-limited-qlora": dict(q_lora_rank=32, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                   routed_scaling_factor=2.0, rope_parameters={**YARN, "rope_theta": 5000.0}),
}
# DeepSeek-V2-Lite's config.json as released (huggingface.co/deepseek-ai/DeepSeek-V2-Lite).
RELEASED_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                 "AutoModel": "modeling_deepseek.DeepseekV2Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "ep_size": 1,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def hf_logits(path, tokens: torch.Tensor) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(tokens).logits


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = DeepseekV2ForCausalLM(DeepseekV2Config(**SHAPE, **CASES[request.param])).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:  # norms away from one, so a missing or swapped one shows
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    if "rope_scaling" in CASES[request.param]:  # back to the release's spelling, which transformers 5 rewrites
        config = json.loads((path / "config.json").read_text())
        rope = config.pop("rope_parameters")
        config.update(rope_theta=rope.pop("rope_theta"), torch_dtype=config.pop("dtype"),
                      rope_scaling={k: v for k, v in rope.items() if k != "rope_type"})
        (path / "config.json").write_text(json.dumps(config))
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = hf(tokens).logits
    return request.param, path, tokens, logits


def test_load_model_matches_transformers(saved, caplog):
    name, path, tokens, logits = saved
    with caplog.at_level(logging.WARNING, logger="moelib"):
        model = load_model(path)
    assert not caplog.records  # every field transformers writes is known, no MTP is declared
    case = CASES[name]
    assert model.cfg.topk_method == case["topk_method"] and model.cfg.q_lora_rank == case["q_lora_rank"]
    assert model.cfg.scoring_func == "softmax" and model.cfg.num_nextn_predict_layers == 0
    assert model.cfg.rope_scaling.mscale_all_dim == 0.707
    assert not any(b.any() for k, b in model.state_dict().items() if k.endswith("e_score_correction_bias"))
    with torch.no_grad():
        ours = model(tokens)
    assert ours.shape == logits.shape and rel_err(ours, logits) <= 1e-5
    # The routing rule is really V2's: V3's (groups by their two best scores, or any groups at all) differs.
    other = build_model(ModelConfig.from_dict({**model.cfg.to_dict(), "topk_method": "noaux_tc", "n_group": 4,
                                               "topk_group": 2}), "fp32")
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert rel_err(other.eval()(tokens), logits) > 1e-4


def test_import_train_export_round_trip(saved, tmp_path):
    name, path, tokens, _ = saved
    import_hf(path, tmp_path / "ck")
    reader = CheckpointReader(tmp_path / "ck")
    cfg = ModelConfig.from_dict(reader.manifest["model"])
    model = build_model(cfg, "fp32", seed=9)
    model.load_state_dict({k: reader.get(k) for k in model.state_dict()})
    # Loss-free balancing stays off, so the router bias stays the zero deepseek_v2 can express.
    trainer = Trainer(cfg, TrainConfig(micro_batch_size=2, seq_length=32, train_iters=2, lr=1e-2, lr_warmup_iters=0,
                                       bias_update_speed=0.0), model=model)
    batch = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        trainer.train_step(batch[:, :-1], batch[:, 1:])
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert not torch.equal(trained["layers.1.mlp.experts.0.up_proj.weight"],
                           reader.get("layers.1.mlp.experts.0.up_proj.weight"))
    save_checkpoint(tmp_path / "trained", trained, cfg, 2)
    out = export_hf(tmp_path / "trained", tmp_path / "hf", "fp32")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v2" and config["topk_method"] == CASES[name]["topk_method"]
    assert "num_nextn_predict_layers" not in config
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.endswith("e_score_correction_bias") for k in index)
    ours = build_model(cfg, "fp32").eval()
    ours.load_state_dict(trained)
    with torch.no_grad():
        assert rel_err(hf_logits(out, tokens), ours(tokens)) <= 1e-5
    # With balancing switched on the bias moves, which deepseek_v2 cannot hold: export refuses by name.
    trained["layers.2.mlp.gate.e_score_correction_bias"][0] = 1e-3
    save_checkpoint(tmp_path / "biased", trained, cfg, 3)
    with pytest.raises(CheckpointError, match="layers.2.mlp.gate.e_score_correction_bias is not zero"):
        export_hf(tmp_path / "biased", tmp_path / "hf2", "fp32")
    assert not (tmp_path / "hf2").exists()


def test_v2_lite_preset_is_the_released_config():
    released = from_hf_config(RELEASED_V2_LITE)
    preset = ModelConfig.from_preset("v2-lite-16b")
    for field in preset.to_dict():
        assert getattr(released, field) == getattr(preset, field), field
    assert released == preset
