"""tools/convert_ckpt.py and moelib.convert: a moelib checkpoint exported to the Hugging Face layout loads in
transformers with the same logits; import gives the checkpoint back bit for bit; FP8 is the released layout."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moelib import ModelConfig, TrainConfig, YarnConfig, load_model
from moelib.convert import export_hf, import_hf
from moelib.model import build_model
from moelib.precision.fp8 import dequantize, quantize
from moelib.train.checkpoint import FORMAT, CheckpointReader, checksum_fields, load_checkpoint, tensor_checksum
from moelib.train.trainer import Trainer

transformers = pytest.importorskip("transformers", reason="transformers is needed for the interop tests")
from _weights import randomize  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Every FP8-quantised dimension is a multiple of 128 or below it: transformers' CPU dequantiser derives the
# block from shape / scale grid, which is only right for such shapes (as in the release).
CFG = dict(vocab_size=512, hidden_size=256, num_hidden_layers=3, intermediate_size=384, moe_intermediate_size=128,
           n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, num_attention_heads=4, q_lora_rank=128,
           kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, init_std=0.05,
           max_position_embeddings=256, rope_scaling=YarnConfig(factor=4.0, original_max_position_embeddings=64))
RANKS = 4


def write_multirank_checkpoint(state: dict, cfg: ModelConfig, root: Path, extra: dict[str, torch.Tensor]) -> Path:
    """The layout a 4-rank run writes (moelib.train.checkpoint.save_checkpoint under mpirun): each rank's
    tensors in its own shard, the manifest mapping global names to shards, optimizer and RNG state beside."""
    step = root / "iter_0000007"
    step.mkdir(parents=True)
    shards: list[dict] = [{} for _ in range(RANKS)]
    for i, (name, t) in enumerate(sorted({**state, **extra}.items())):
        shards[i % RANKS][name] = t.contiguous()
    weight_map = {}
    for r, tensors in enumerate(shards):
        fname = f"model-{r:05d}-of-{RANKS:05d}.safetensors"
        save_file(tensors, str(step / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    sums = checksum_fields({name: tensor_checksum(t) for tensors in shards for name, t in tensors.items()})
    manifest = {"format": FORMAT, "step": 7, "model": cfg.to_dict(), "weight_map": weight_map, **sums}
    (step / "manifest.json").write_text(json.dumps(manifest))
    (root / "latest").write_text("iter_0000007\n")
    (step / "tokenizer.json").write_text('{"version": "1.0"}')
    return step


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = ModelConfig.from_preset("tiny", **CFG)
    model = build_model(cfg, "fp32", seed=0).eval()
    randomize(model, seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {f"ema.{k}": 0.5 * v for k, v in state.items() if not k.endswith("e_score_correction_bias")}
    extra = {**ema, "optimizer.exp_avg.embed_tokens.weight": torch.ones(3), "rng.torch.rank0": torch.zeros(8).byte()}
    root = tmp_path_factory.mktemp("ckpt")
    write_multirank_checkpoint(state, cfg, root, extra)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(tokens)
    return cfg, model, state, root, tokens, logits


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    root = trained[3]
    base = tmp_path_factory.mktemp("hf")
    return {dt: export_hf(root, base / dt, dt) for dt in ("fp32", "bf16", "fp8")}


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(tokens).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def read_hf(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for fname in sorted(set(index.values())):
        with safe_open(str(path / fname), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(out) == set(index)
    return out


def test_fp32_export_matches_transformers(trained, exported):
    cfg, model, state, _, tokens, logits = trained
    path = exported["fp32"]
    theirs = hf_logits(path, tokens)
    assert theirs.shape == (2, 48, cfg.vocab_size) and rel_err(theirs, logits) <= 1e-5
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["num_nextn_predict_layers"] == 1
    assert config["rope_scaling"]["type"] == "yarn" and config["rope_scaling"]["factor"] == 4.0
    assert config["torch_dtype"] == "float32" and "quantization_config" not in config
    assert (path / "tokenizer.json").is_file()
    hf = read_hf(path)
    mtp = f"model.layers.{cfg.num_hidden_layers}"
    assert torch.equal(hf[f"{mtp}.embed_tokens.weight"], state["embed_tokens.weight"])
    assert torch.equal(hf[f"{mtp}.shared_head.head.weight"], state["lm_head.weight"])
    assert torch.equal(hf[f"{mtp}.eh_proj.weight"], state["mtp.0.eh_proj.weight"])
    assert torch.equal(hf[f"{mtp}.mlp.experts.5.down_proj.weight"], state["mtp.0.layer.mlp.experts.5.down_proj.weight"])
    bias = hf["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and torch.equal(bias, state["layers.1.mlp.gate.e_score_correction_bias"])
    assert not any(k.startswith(("model.optimizer", "model.rng", "model.ema")) for k in hf)


def test_bf16_export_is_the_rounded_model(trained, exported):
    cfg, model, state, _, tokens, logits = trained
    hf = read_hf(exported["bf16"])
    for name, t in hf.items():
        assert t.dtype == (torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16), name
    rounded = build_model(cfg, "fp32", seed=0).eval()
    rounded.load_state_dict({k: v if k.endswith("e_score_correction_bias") else v.bfloat16().float()
                             for k, v in state.items()})
    with torch.no_grad():
        ours = rounded(tokens)
    theirs = hf_logits(exported["bf16"], tokens)
    assert rel_err(theirs, ours) <= 1e-5  # the only difference from fp32 is the rounding of the weights
    assert rel_err(theirs, logits) <= 0.05


def test_fp8_export_is_the_release_layout_and_loads_in_transformers(trained, exported):
    cfg, model, state, _, tokens, logits = trained
    path = exported["fp8"]
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    hf = read_hf(path)
    high = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight", "mlp.gate.weight", "eh_proj.weight")
    for name, t in hf.items():
        if name.endswith("_scale_inv"):
            w = hf[name.removesuffix("_scale_inv")]
            assert t.dtype == torch.float32 and t.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128)), name
        elif t.dim() == 2 and not name.endswith(high):
            assert t.dtype == torch.float8_e4m3fn and f"{name}_scale_inv" in hf, name
        else:
            assert t.dtype == (torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16), name
    # Block quantisation error: each weight within half an e4m3 step (2^-4 relative, or the subnormal step).
    w = state["layers.1.mlp.experts.3.up_proj.weight"]
    dq = dequantize(hf["model.layers.1.mlp.experts.3.up_proj.weight"],
                    hf["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"], (128, 128))
    step = hf["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"].max() * 2.0**-9
    assert bool(((dq - w).abs() <= w.abs() * 2.0**-4 + step).all())
    # transformers' own FP8 path (dequantising on CPU, since there is no GPU) sees exactly those weights.
    theirs = hf_logits(path, tokens)
    ours_model = load_model(path)
    with torch.no_grad():
        ours = ours_model(tokens)
    assert rel_err(theirs, ours) <= 1e-5
    assert 0 < rel_err(theirs, logits) <= 0.5


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_import_of_export_is_bit_identical(trained, exported, dtype, tmp_path):
    cfg, model, state, *_ = trained
    step = import_hf(exported[dtype], tmp_path / "back")
    manifest, back = load_checkpoint(tmp_path / "back")
    assert ModelConfig.from_dict(manifest["model"]) == cfg and manifest["step"] == 0 and "train" not in manifest
    assert back.keys() == state.keys() and any(k.startswith("mtp.0.") for k in back)
    for k, v in state.items():
        want = v if dtype == "fp32" or k.endswith("e_score_correction_bias") else v.bfloat16().float()
        assert back[k].dtype == torch.float32 and torch.equal(back[k], want), k
    assert (step / "tokenizer.json").is_file()


def test_import_no_mtp_drops_stored_mtp_modules(trained, exported, tmp_path):
    cfg, model, state, *_ = trained
    import_hf(exported["fp32"], tmp_path / "back", no_mtp=True)
    manifest, back = load_checkpoint(tmp_path / "back")
    assert manifest["model"] == {**cfg.to_dict(), "num_nextn_predict_layers": 0}
    assert back.keys() == {k for k in state if not k.startswith("mtp.")}
    assert all(torch.equal(back[k], state[k]) for k in back)


def test_fp8_import_dequantises_edge_blocks(tmp_path):
    """Shapes that are not whole 128 blocks (edge blocks with their own scale) round-trip through moelib's
    dequantiser exactly; transformers 5.24 cannot read these (it assumes whole blocks)."""
    cfg = ModelConfig.from_preset("tiny", **{**CFG, "hidden_size": 192, "intermediate_size": 320,
                                             "qk_nope_head_dim": 16, "v_head_dim": 16})
    model = build_model(cfg, "fp32", seed=3)
    randomize(model, seed=4)
    state = model.state_dict()
    write_multirank_checkpoint(state, cfg, tmp_path / "ck", {})
    export_hf(tmp_path / "ck", tmp_path / "hf", "fp8")
    import_hf(tmp_path / "hf", tmp_path / "back")
    _, back = load_checkpoint(tmp_path / "back")
    w = state["layers.0.mlp.up_proj.weight"]  # [320, 192]: 3 x 2 blocks, four of them partial
    assert torch.equal(back["layers.0.mlp.up_proj.weight"], dequantize(*quantize(w, (128, 128)), (128, 128)))
    bias = "layers.2.mlp.gate.e_score_correction_bias"
    assert torch.equal(back[bias], state[bias])
    assert torch.equal(back["lm_head.weight"], state["lm_head.weight"].bfloat16().float())


def test_ema_export(trained, tmp_path):
    _, _, state, root, *_ = trained
    hf = read_hf(export_hf(root, tmp_path / "ema", "fp32", ema=True))
    assert torch.equal(hf["model.layers.2.self_attn.o_proj.weight"], 0.5 * state["layers.2.self_attn.o_proj.weight"])
    assert torch.equal(hf["model.layers.2.mlp.gate.e_score_correction_bias"],
                       state["layers.2.mlp.gate.e_score_correction_bias"])  # buffers have no EMA


def test_load_model_reads_both_formats(trained, exported):
    _, _, _, root, tokens, logits = trained
    for path in (root, exported["fp32"]):
        model = load_model(path)
        assert not model.training
        with torch.no_grad():
            assert torch.equal(model(tokens), logits)


def test_training_continues_from_an_imported_checkpoint(trained, exported, tmp_path):
    cfg, *_ = trained
    import_hf(exported["fp32"], tmp_path / "ck")
    reader = CheckpointReader(tmp_path / "ck")
    model = build_model(ModelConfig.from_dict(reader.manifest["model"]), "fp32", seed=9)
    model.load_state_dict({k: reader.get(k) for k in model.state_dict()})
    trainer = Trainer(cfg, TrainConfig(micro_batch_size=2, seq_length=32, train_iters=4, lr=3e-3, lr_warmup_iters=0,
                                       bias_update_speed=1e-2), model=model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(5))
    losses = [trainer.train_step(tokens[:, :-1], tokens[:, 1:]).lm_loss for _ in range(4)]
    assert losses[-1] < losses[0]
    bias = "layers.1.mlp.gate.e_score_correction_bias"
    assert not torch.equal(model.state_dict()[bias], reader.get(bias))  # the router bias trains on


@pytest.mark.slow
def test_cli_streams_into_several_shards(trained, tmp_path):
    _, _, state, root, *_ = trained
    out = tmp_path / "hf"
    cmd = [sys.executable, str(REPO / "tools" / "convert_ckpt.py"), "export", "--load", str(root), "--save", str(out),
           "--dtype", "bf16", "--max-shard-size", "1MB"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and shards[-1].name == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in shards) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in shards)
    # A tensor never straddles shards, and only a tensor above the limit makes a shard larger than it.
    for p in shards:
        with safe_open(str(p), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        assert len(sizes) == 1 or p.stat().st_size <= 1_000_000 + 65536
    assert len(read_hf(out)) == len(state) + 2  # + the MTP copies of embedding and head
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 2 and again.stderr.startswith("convert_ckpt: error: ") and str(out) in again.stderr
    assert "Traceback" not in again.stderr
