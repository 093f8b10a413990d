"""moelib.load_model(path, dtype): a moelib checkpoint, an HF directory and the HF block-FP8 export all load,
in every dtype, and generate."""

import os
import subprocess
import sys

import pytest
import torch
from _hf import write_hf
from test_generate_cli import DIMS

import moelib
from moelib import ModelConfig
from moelib.convert import TensorFile, export_hf, import_hf
from moelib.convert import load_model as convert_load
from moelib.convert.load import _blocks
from moelib.inference.fp8_weights import dequantized
from moelib.inference.load import cast_weights
from moelib.model import build_model
from moelib.train.checkpoint import save_checkpoint


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


def state_of(model):
    """Every parameter and buffer, with the FP8 block scales, by name."""
    out = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    out.update({f"{n}.scale_inv": p.scale_inv for n, p in model.named_parameters() if hasattr(p, "scale_inv")})
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_block_by_block_load_equals_casting_the_whole_fp32_model(formats, dtype):
    """load_model casts each block as it reads it; the result is the whole fp32 model cast at once, bit for bit
    (dtypes, values, FP8 scales, the recomputed RoPE frequencies and zeroed load counters included)."""
    for path in formats.values():
        ours = state_of(moelib.load_model(path, dtype))
        fp32 = convert_load(path)
        assert all(t.device.type == "cpu" for t in state_of(fp32).values())
        reference = state_of(cast_weights(fp32, dtype))
        assert ours.keys() == reference.keys()
        for name, t in reference.items():
            assert ours[name].dtype == t.dtype and torch.equal(ours[name].float(), t.float()), name
        fresh = build_model(fp32.cfg, "fp32", seed=0)
        assert torch.equal(ours["inv_freq"], fresh.inv_freq)


def test_loading_in_bf16_never_holds_the_model_in_fp32(tmp_path):
    """Peak resident memory of a child process while it loads, over its memory just before (imports and the
    checkpoint's header already done), stays under the bf16 model plus twice its largest block in fp32 (the block
    being filled and the tensors read for it). Before, the whole fp32 model and a freshly initialised one were
    held together: over 2x the fp32 bytes (measured 2.0x). glibc is told to return large freed blocks at once,
    so the peak counts live tensors."""
    cfg = ModelConfig.from_preset("tiny", hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                                  num_hidden_layers=8, vocab_size=4096)
    model = build_model(cfg, "fp32", seed=0)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    largest_block = max(sum(p.numel() * 4 for p in block.parameters()) for _, block in _blocks(model))
    bound = fp32_bytes / 2 + 2 * largest_block + 16 * 2**20  # + 16 MiB for the interpreter's own growth
    ckpt = save_checkpoint(tmp_path / "ckpt", model.state_dict(), cfg, step=0)
    del model
    script = (
        "import sys, moelib\n"
        "from moelib.convert.read import open_moelib\n"
        "def kib(field): return int(open('/proc/self/status').read().split(field + ':')[1].split()[0])\n"
        "open_moelib(sys.argv[1])[2].close()\n"
        "before = kib('VmRSS')\n"
        "model = moelib.load_model(sys.argv[1], 'bf16')\n"
        "print(1024 * (kib('VmHWM') - before))\n")
    out = subprocess.run([sys.executable, "-c", script, str(ckpt)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"})
    peak = int(out.stdout.split()[-1])
    assert bound < fp32_bytes  # the test tells the two loaders apart
    assert fp32_bytes / 2 < peak < bound, (peak, bound, fp32_bytes)
