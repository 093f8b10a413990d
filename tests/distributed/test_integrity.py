"""A 2-rank save records a checksum for every tensor of every rank's shard, and `mpirun -n 2 v3_pretrain --load`
of a checkpoint with one flipped byte fails, naming the tensor and its shard on stderr."""

import json
import shutil
import sys

import pytest
from _mpi import REPO, require_mpirun, run

from moelib.convert import TensorFile
from moelib.train.checkpoint import load_checkpoint, tensor_checksum

RECIPE = str(REPO / "recipes" / "v3_pretrain.py")
ARGS = ["--precision", "fp32", "--seq-length", "32", "--micro-batch-size", "2", "--peak-tflops", "1"]


def recipe(*args: str, timeout: float = 300) -> tuple[int, str, str]:
    cmd = [require_mpirun(), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-n", "2",
           sys.executable, RECIPE, *ARGS, *args]
    return run(cmd, timeout)


def flip_middle_byte(step, name: str) -> str:
    """Change one byte of tensor ``name`` in its shard; returns the shard's file name."""
    shard = step / json.loads((step / "manifest.json").read_text())["weight_map"][name]
    f = TensorFile(shard)
    _, _, lo, hi = f.specs[name]
    data = bytearray(shard.read_bytes())
    data[f.start + (lo + hi) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    return shard.name


@pytest.mark.dist
def test_load_of_a_corrupt_rank_shard_names_the_tensor(tmp_path):
    rc, out, err = recipe("--train-iters", "1", "--save", str(tmp_path / "ck"))
    assert rc == 0, err[-3000:]
    step = tmp_path / "ck" / "iter_0000001"
    manifest, state = load_checkpoint(step)
    assert len(set(manifest["weight_map"].values())) == 2  # one shard per rank, all verified on this read
    assert {k: tensor_checksum(t) for k, t in state.items()} == manifest["checksums"]

    # Rank 1 wrote expert 12's weights (EP 2); resumed with EP 1, every rank reads them, rank 0 included.
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ck", bad)
    name = "layers.1.mlp.experts.12.down_proj.weight"
    shard = flip_middle_byte(bad / "iter_0000001", name)
    assert shard == "model-00001-of-00002.safetensors"
    rc, out, err = recipe("--train-iters", "2", "--load", str(bad), "--save", str(tmp_path / "out"),
                          "--expert-model-parallel-size", "1")
    assert rc != 0 and f"{shard}: tensor {name} is corrupt" in err, err[-3000:]
    assert "resumed from" not in out and not list((tmp_path / "out").glob("iter_*"))
