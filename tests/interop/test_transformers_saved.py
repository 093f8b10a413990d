"""A DeepSeek-V3 checkpoint written by transformers' own save_pretrained (config in transformers 5's spelling, no
MTP layer stored although the config declares one) loads, imports and trains on in moelib."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moelib import ModelConfig, load_model
from moelib.convert import DEFAULT_SEED, import_hf
from moelib.model import build_model
from moelib.train.checkpoint import load_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers is needed for the interop tests")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# vocab 4096: the recipe test trains on the default corpus at the tiny preset's vocabulary (cached once).
SHAPE = dict(vocab_size=4096, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_group=4, topk_group=2,
             num_experts_per_tok=3, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, first_k_dense_replace=1, max_position_embeddings=256, initializer_range=0.05)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 5000.0}


def randomize_hf(model: torch.nn.Module, seed: int) -> None:
    """Norms away from one and router biases away from zero, so a missing or swapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**SHAPE, rope_parameters=dict(YARN))).eval()
    randomize_hf(hf, seed=1)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = hf(tokens).logits
    return path, tokens, logits


def test_transformers_save_declares_mtp_but_stores_none(saved):
    path, *_ = saved
    config = json.loads((path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["rope_parameters"]["rope_type"] == "yarn"
    assert "rope_scaling" not in config and "rope_theta" not in config and config["dtype"] == "float32"
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("model.layers.3.")]


def test_load_model_gives_the_main_model_with_one_warning(saved, caplog):
    path, tokens, logits = saved
    with caplog.at_level(logging.WARNING, logger="moelib"):
        model = load_model(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "1 MTP layer(s) (model.layers.3.*)" in warnings[0] and "absent" in warnings[0]
    assert model.cfg.num_nextn_predict_layers == 0 and len(model.mtp) == 0
    assert model.cfg.rope_scaling.factor == 4.0 and model.cfg.rope_theta == 5000.0
    bias = model.state_dict()["layers.2.mlp.gate.e_score_correction_bias"]
    assert bias.abs().min() > 0
    with torch.no_grad():
        ours = model(tokens)
    assert ours.shape == logits.shape and rel_err(ours, logits) <= 1e-5


def test_import_initialises_the_missing_mtp_as_a_new_run_would(saved, tmp_path, caplog):
    path, tokens, logits = saved
    with caplog.at_level(logging.WARNING, logger="moelib"):
        import_hf(path, tmp_path / "ck")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"freshly initialised with seed {DEFAULT_SEED}" in warnings[0]
    manifest, state = load_checkpoint(tmp_path / "ck")
    cfg = ModelConfig.from_dict(manifest["model"])
    assert cfg.num_nextn_predict_layers == 1
    fresh = build_model(cfg, "fp32", seed=DEFAULT_SEED).state_dict()
    mtp = [k for k in fresh if k.startswith("mtp.")]
    assert len(mtp) > 20 and all(torch.equal(state[k], fresh[k]) for k in mtp)
    assert not torch.equal(state["layers.1.mlp.experts.0.up_proj.weight"],
                           fresh["layers.1.mlp.experts.0.up_proj.weight"])
    with torch.no_grad():
        assert rel_err(load_model(tmp_path / "ck")(tokens), logits) <= 1e-5


def test_cli_import_no_mtp_drops_the_modules(saved, tmp_path):
    path, tokens, logits = saved
    cmd = [sys.executable, str(REPO / "tools" / "convert_ckpt.py"), "import", "--load", str(path), "--save",
           str(tmp_path / "ck"), "--no-mtp", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("MTP layer(s)") == 1 and "dropped (--no-mtp)" in r.stderr
    manifest, state = load_checkpoint(tmp_path / "ck")
    assert manifest["model"]["num_nextn_predict_layers"] == 0 and not any(k.startswith("mtp.") for k in state)
    with torch.no_grad():
        assert rel_err(load_model(tmp_path / "ck")(tokens), logits) <= 1e-5


def test_recipe_load_takes_the_model_from_the_imported_checkpoint(saved, tmp_path):
    path, *_ = saved
    import_hf(path, tmp_path / "ck")
    _, imported = load_checkpoint(tmp_path / "ck")
    recipe = [sys.executable, str(REPO / "recipes" / "v3_pretrain.py"), "--load", str(tmp_path / "ck"),
              "--train-iters", "2", "--seq-length", "32", "--micro-batch-size", "2", "--log-interval", "1",
              "--peak-tflops", "1", "--save", str(tmp_path / "run"), "--log-json", str(tmp_path / "log.jsonl")]
    r = subprocess.run(recipe, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]  # held-out rows carry valid_*/test_* keys instead
    assert [row["step"] for row in rows] == [1, 2] and all(row["mtp_loss"] > 0 for row in rows)
    manifest, state = load_checkpoint(tmp_path / "run")
    assert manifest["step"] == 2 and manifest["model"] == load_checkpoint(tmp_path / "ck")[0]["model"]
    for name in ("mtp.0.eh_proj.weight", "mtp.0.layer.mlp.experts.0.up_proj.weight", "layers.0.mlp.up_proj.weight"):
        assert not torch.equal(state[name], imported[name]), name  # trained, MTP included
    # A --config whose model is another one is refused in one line, before any work.
    r = subprocess.run(recipe[:2] + ["--config", "tiny"] + recipe[2:], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1
    assert "model config differs from --config tiny (hidden_size 64 there, 256 here)" in lines[0]
