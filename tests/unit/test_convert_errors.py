"""Bad input to the checkpoint converter: one CheckpointError/ConfigError naming the file or tensor, and nothing
left under the output name (not even a temporary directory)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moelib import ModelConfig
from moelib.convert import export_hf, import_hf, load_model, parse_size
from moelib.errors import CheckpointError, ConfigError
from moelib.model import build_model
from moelib.train.checkpoint import save_checkpoint

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32,
             n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, num_attention_heads=2, q_lora_rank=32,
             kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


@pytest.fixture()
def dirs(tmp_path):
    cfg = ModelConfig.from_preset("tiny", **SMALL)
    step = save_checkpoint(tmp_path / "ck", build_model(cfg, "fp32", seed=0).state_dict(), cfg, 3)
    hf = export_hf(tmp_path / "ck", tmp_path / "hf", "fp32", max_shard_bytes=100_000)
    return tmp_path, step, hf


def fails(fn, *args, match: str, error=CheckpointError) -> str:
    out = Path(args[1])
    with pytest.raises(error, match=match) as e:
        fn(*args)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*")), "half-written output left behind"
    return str(e.value)


def index_of(hf: Path) -> dict:
    return json.loads((hf / "model.safetensors.index.json").read_text())


def test_missing_shard(dirs):
    tmp, step, hf = dirs
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert str(shard) in fails(import_hf, hf, tmp / "out", match="shard file is missing")
    (step / "model-00000-of-00001.safetensors").unlink()
    fails(export_hf, step, tmp / "out", match="model-00000-of-00001.safetensors: shard file is missing")


@pytest.mark.parametrize("keep, says", [(4, "truncated or not a safetensors file"), (1000, "truncated or not a"),
                                        (-100, "truncated: the header describes")])
def test_truncated_shard(dirs, keep, says):
    tmp, step, hf = dirs
    shard = step / "model-00000-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:keep])
    fails(export_hf, step, tmp / "out", match=f"{shard}: {says}")


def test_index_names_a_tensor_the_shard_lacks(dirs):
    tmp, _, hf = dirs
    index = index_of(hf)
    first = sorted(index["weight_map"].values())[0]
    name = next(k for k, v in index["weight_map"].items() if v != first)
    index["weight_map"][name] = first
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(import_hf, hf, tmp / "out", match=rf"{first}: tensor {name}, which model.safetensors.index.json maps")


def test_tensor_missing_from_hf_dir(dirs):
    tmp, _, hf = dirs
    index = index_of(hf)
    del index["weight_map"]["model.layers.2.eh_proj.weight"]  # the MTP module public converters drop
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(import_hf, hf, tmp / "out", match="tensor model.layers.2.eh_proj.weight is missing")


def rewrite(hf: Path, name: str, tensor: torch.Tensor) -> None:
    """Replace one tensor of an HF directory by moving it into a shard of its own."""
    index = index_of(hf)
    save_file({name: tensor}, str(hf / "extra.safetensors"))
    index["weight_map"][name] = "extra.safetensors"
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))


def test_shape_mismatch(dirs):
    tmp, _, hf = dirs
    rewrite(hf, "model.layers.1.mlp.experts.2.up_proj.weight", torch.zeros(33, 64))
    fails(import_hf, hf, tmp / "out",
          match=r"extra.safetensors: tensor model.layers.1.mlp.experts.2.up_proj.weight has shape \[33, 64\], but "
                r"the model config needs \[32, 64\]")


def test_dtype_mismatch(dirs):
    tmp, _, hf = dirs
    rewrite(hf, "model.norm.weight", torch.zeros(64, dtype=torch.int32))
    fails(import_hf, hf, tmp / "out", match="tensor model.norm.weight has dtype torch.int32")


def test_fp8_weight_without_scales(dirs):
    tmp, _, hf = dirs
    rewrite(hf, "model.layers.0.mlp.up_proj.weight", torch.zeros(96, 64, dtype=torch.float8_e4m3fn))
    fails(import_hf, hf, tmp / "out", match="FP8 tensor model.layers.0.mlp.up_proj.weight has no .*_scale_inv")


def test_unknown_tensor(dirs):
    tmp, _, hf = dirs
    rewrite(hf, "model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(4))
    fails(import_hf, hf, tmp / "out", match="tensor model.layers.0.self_attn.rotary_emb.inv_freq is not part of")


def test_config_of_another_model_type(dirs):
    tmp, _, hf = dirs
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    fails(import_hf, hf, tmp / "out", match="config.json: model_type is 'llama', expected 'deepseek_v3'",
          error=ConfigError)
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        load_model(hf)


def test_manifest_missing_tensor(dirs):
    tmp, step, _ = dirs
    manifest = json.loads((step / "manifest.json").read_text())
    del manifest["weight_map"]["layers.1.mlp.gate.e_score_correction_bias"]
    (step / "manifest.json").write_text(json.dumps(manifest))
    fails(export_hf, step, tmp / "out", match="tensor layers.1.mlp.gate.e_score_correction_bias is missing")


def test_ema_without_ema_tensors(dirs):
    tmp, step, _ = dirs
    with pytest.raises(CheckpointError, match="holds no ema.* tensors"):
        export_hf(step, tmp / "out", "fp32", ema=True)
    assert not (tmp / "out").exists()


def test_existing_output_needs_overwrite(dirs):
    tmp, step, hf = dirs
    before = index_of(hf)
    with pytest.raises(CheckpointError, match=f"{hf}: output exists and is not empty .*--overwrite"):
        export_hf(step, hf, "bf16")
    assert index_of(hf) == before  # untouched
    export_hf(step, hf, "bf16", overwrite=True)
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not list(tmp.glob(".hf.*"))
    (tmp / "empty").mkdir()
    import_hf(hf, tmp / "empty")  # an empty directory is fine
    assert (tmp / "empty" / "latest").read_text() == "iter_0000000\n"


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("100") == 100
    for bad in ("lots", "1.2.3GB", "0"):
        with pytest.raises(ConfigError, match="--max-shard-size"):
            parse_size(bad)
