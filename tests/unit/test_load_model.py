"""moelib.load_model(path, dtype): a moelib checkpoint, an HF directory and the HF block-FP8 export all load,
in every dtype, and generate."""

import pytest
import torch
from _hf import write_hf
from test_generate_cli import DIMS

import moelib
from moelib import ModelConfig
from moelib.convert import TensorFile, export_hf, import_hf
from moelib.inference.fp8_weights import dequantized
from moelib.model import build_model


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    # Dims a multiple of 128, so the export's blocks and ours coincide.
    cfg = ModelConfig.from_preset("tiny", **{**DIMS, "hidden_size": 128, "q_lora_rank": 128})
    hf = write_hf(build_model(cfg, "fp32", seed=0), root / "hf")
    ckpt = import_hf(hf, root / "ckpt", progress=False)
    return {"moelib": ckpt, "hf": hf, "hf-fp8": export_hf(ckpt, root / "fp8", "fp8", progress=False)}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_every_format_loads_in_every_dtype_and_generates(formats, dtype, one_thread):
    runs = {name: moelib.generate(moelib.load_model(path, dtype), [[1, 2, 3]], 6).tokens
            for name, path in formats.items()}
    assert all(t.shape == (1, 9) for t in runs.values())
    assert torch.equal(runs["moelib"], runs["hf"])  # the same weights


def test_the_fp8_export_is_requantised_without_loss(formats):
    """Its weights are already E4M3 on 128x128 blocks: quantising them again gives the same values."""
    model = moelib.load_model(formats["hf-fp8"], "fp8")
    ours = model.layers["0"].self_attn.q_a_proj.weight
    f = TensorFile(next(formats["hf-fp8"].glob("*.safetensors")))
    name = "model.layers.0.self_attn.q_a_proj"
    theirs = dequantized(f.get(f"{name}.weight"), f.get(f"{name}.weight_scale_inv"))
    f.close()
    assert ours.dtype == torch.float8_e4m3fn
    assert torch.equal(dequantized(ours, ours.scale_inv), theirs)
