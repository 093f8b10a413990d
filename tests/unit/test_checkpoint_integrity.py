"""Checkpoint checksums: a byte flipped in any tensor of any shard is refused, naming the tensor and its file,
by CheckpointReader, load_model and tools/convert_ckpt.py; checkpoints without checksums load with a warning."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moelib import CheckpointError, ModelConfig
from moelib.convert import TensorFile, export_hf, import_hf, load_model
from moelib.model import build_model
from moelib.train.checkpoint import CheckpointReader, load_checkpoint, save_checkpoint, tensor_checksum

REPO = Path(__file__).resolve().parents[2]
CFG = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16,
           n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=8,
           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_attention_heads=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A saved checkpoint (one shard, with bf16 / uint8 / int64 tensors beside the fp32 weights) and the same
    weights written through export + import into many small shards."""
    tmp = tmp_path_factory.mktemp("integrity")
    cfg = ModelConfig.from_preset("tiny", **CFG)
    state = build_model(cfg, "fp32", seed=0).state_dict()
    extra = {"optimizer.exp_avg.x": torch.randn(5, 3).bfloat16(), "rng.torch.rank0": torch.random.get_rng_state(),
             "counts": torch.arange(7), "empty": torch.zeros(0)}
    saved = save_checkpoint(tmp / "saved", {**state, **extra}, cfg, 1)
    export_hf(saved, tmp / "hf", "fp32")
    sharded = import_hf(tmp / "hf", tmp / "sharded", max_shard_bytes=20_000)
    assert len(list(sharded.glob("*.safetensors"))) > 5
    return saved, sharded


def tensor_bytes(step: Path) -> list[tuple[Path, str, int, int]]:
    """(shard, tensor, first byte in the file, byte count) of every non-empty tensor of a checkpoint."""
    out = []
    for shard in sorted(step.glob("*.safetensors")):
        f = TensorFile(shard)
        out += [(shard, name, f.start + lo, hi - lo) for name, (_, _, lo, hi) in f.specs.items() if hi > lo]
    return out


def flip(path: Path, offset: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["saved", "sharded"]), pick=st.floats(0, 1, exclude_max=True),
       where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_a_flipped_byte_in_any_tensor_is_refused_by_name(checkpoints, which, pick, where, mask):
    step = checkpoints[0] if which == "saved" else checkpoints[1]
    tensors = tensor_bytes(step)
    shard, name, start, nbytes = tensors[int(pick * len(tensors))]
    offset = start + int(where * nbytes)
    reader = CheckpointReader(step)
    flip(shard, offset, mask)
    try:
        with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor {name} is corrupt"):
            reader.get(name)
        others = [n for _, n, _, _ in tensors if n != name][:3]
        assert all(reader.get(n).numel() for n in others)  # the rest of the checkpoint still reads
    finally:
        flip(shard, offset, mask)
    CheckpointReader(step).get(name)


def test_manifest_records_every_tensor(checkpoints):
    for step in checkpoints:
        manifest = json.loads((step / "manifest.json").read_text())
        assert manifest["checksum_algorithm"] == "crc32"
        assert manifest["checksums"].keys() == manifest["weight_map"].keys()
        _, state = load_checkpoint(step)
        assert all(manifest["checksums"][k] == tensor_checksum(t) for k, t in state.items())


def corrupt_copy(step: Path, dest: Path, name: str) -> Path:
    """A copy of checkpoint ``step`` with one byte of tensor ``name`` changed; returns the copy."""
    import shutil

    shutil.copytree(step, dest)
    shard, _, start, nbytes = next(t for t in tensor_bytes(dest) if t[1] == name)
    flip(shard, start + nbytes // 2, 0x40)
    return dest


def test_load_model_and_convert_refuse_a_corrupt_tensor(checkpoints, tmp_path):
    name = "layers.1.self_attn.o_proj.weight"
    bad = corrupt_copy(checkpoints[0], tmp_path / "bad", name)
    with pytest.raises(CheckpointError, match=f"tensor {name} is corrupt"):
        load_model(bad)
    with pytest.raises(CheckpointError, match=f"tensor {name} is corrupt"):
        export_hf(bad, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    load_model(checkpoints[0])


def test_convert_ckpt_cli_exits_non_zero_with_one_line(checkpoints, tmp_path):
    name = "layers.0.mlp.gate_proj.weight"
    bad = corrupt_copy(checkpoints[1], tmp_path / "bad", name)
    cmd = [sys.executable, str(REPO / "tools" / "convert_ckpt.py"), "export", "--load", str(bad), "--save",
           str(tmp_path / "hf"), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"tensor {name} is corrupt" in lines[0] and ".safetensors" in lines[0], done.stderr
    assert not (tmp_path / "hf").exists()


def test_checkpoint_without_checksums_loads_with_a_warning(checkpoints, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(checkpoints[0], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["checksums"], manifest["checksum_algorithm"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="no tensor checksums"):
        reader = CheckpointReader(old)
    assert all(torch.equal(reader.get(k), t) for k, t in load_checkpoint(checkpoints[0])[1].items())
