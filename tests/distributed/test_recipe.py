"""recipes/v3_pretrain.py under mpirun: it trains, writes one layout-free checkpoint, and bad flags fail early."""

import json
import sys

import pytest
from _mpi import REPO, require_mpirun, run, worker_env

from moelib import ModelConfig
from moelib.model import build_model
from moelib.train.checkpoint import load_checkpoint

RECIPE = str(REPO / "recipes" / "v3_pretrain.py")


def mpirun_recipe(n: int, *args: str, timeout: float = 600):
    cmd = [require_mpirun(), "--allow-run-as-root", "--oversubscribe", "-n", str(n), sys.executable, RECIPE, *args]
    return run(cmd, timeout, worker_env())


@pytest.mark.dist
def test_four_ranks_train_and_checkpoint(tmp_path):
    rc, out, err = mpirun_recipe(4, "--train-iters", "2", "--seq-length", "32", "--micro-batch-size", "2",
                                 "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                                 "--log-interval", "1", "--save", str(tmp_path), "--log-json",
                                 str(tmp_path / "log.jsonl"), "--tensorboard-dir", str(tmp_path / "tb"))
    assert rc == 0, err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # rank 0 only, once per step
    for key in ("loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "max_vio", "tokens_per_s", "tflops", "mfu"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert "TFLOP/s" in out and "MFU" in out and "balance" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/lm_loss")] == [1, 2]
    assert out.count("checkpoint:") == 1 and "PP 2 x DP 2 (EP 2 x EDP 1), dualpipe" in out
    manifest, state = load_checkpoint(tmp_path)
    full = build_model(ModelConfig.from_preset("tiny"), "fp32", device="meta").state_dict()
    model_keys = {k for k in state if not k.startswith(("optimizer.", "rng."))}
    assert manifest["step"] == 2 and model_keys == set(full)
    assert all(state[k].shape == full[k].shape for k in full)
    # AdamW moments of every parameter (not of the router-bias buffers), each written once.
    params = {k for k in full if not k.endswith("e_score_correction_bias")}
    assert {k.removeprefix("optimizer.exp_avg.") for k in state if k.startswith("optimizer.exp_avg.")} == params
    assert {k for k in state if k.startswith("rng.")} == {f"rng.torch.rank{r}" for r in range(4)}


@pytest.mark.dist
@pytest.mark.slow
def test_sixteen_ranks_default_layout(tmp_path):
    rc, out, err = mpirun_recipe(16, "--train-iters", "3", "--log-interval", "1", "--save", str(tmp_path))
    assert rc == 0, err[-3000:]
    step_lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert "16 rank(s): PP 2 x DP 8" in out and len(step_lines) == 3, out


@pytest.mark.dist
@pytest.mark.parametrize("flags, message", [
    (["--pipeline-model-parallel-size", "3"], "world size 4 is not divisible by pipeline size 3"),
    (["--expert-model-parallel-size", "3"], "expert-parallel size 3"),
    (["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipe", "--num-microbatches", "3"],
     "micro-batches"),
])
def test_bad_layout_fails_with_one_line_on_rank_0(flags, message):
    rc, out, err = mpirun_recipe(4, "--train-iters", "1", *flags, timeout=120)
    assert rc != 0
    lines = [line for line in err.splitlines() if "v3_pretrain: error:" in line]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err
