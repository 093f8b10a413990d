"""Faults: a non-finite step is skipped (and too many in a row stop the run); SIGTERM on any rank saves a
checkpoint on every rank and exits cleanly."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _mpi import REPO, require_mpirun, worker_env

from moelib import ModelConfig, TrainConfig
from moelib.config import ParallelConfig
from moelib.train.checkpoint import CheckpointReader
from moelib.train.faults import SkipGuard, TooManySkippedSteps
from moelib.train.parallel_trainer import ParallelTrainer

RECIPE = str(REPO / "recipes" / "v3_pretrain.py")


def test_non_finite_step_is_skipped_and_guarded():
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=2)
    trainer = ParallelTrainer(cfg, TrainConfig(micro_batch_size=2, seq_length=16, precision={"backend": "fp32"}),
                              ParallelConfig())
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    assert not trainer.train_step(tokens[:, :-1], tokens[:, 1:]).skipped
    model = next(iter(trainer.models.values()))
    with torch.no_grad():
        model.layers["1"].self_attn.o_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = trainer.train_step(tokens[:, :-1], tokens[:, 1:])
    assert r.skipped and trainer.step == 1 and trainer.optimizer.step_count == 1
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)
    guard = SkipGuard(3)
    guard.update(True, 1)
    guard.update(False, 2)
    guard.update(True, 2)
    guard.update(True, 2)
    with pytest.raises(TooManySkippedSteps, match="3 steps in a row"):
        guard.update(True, 2)


def start(cmd, tmp_path):
    log = open(tmp_path / "out.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=worker_env(),
                            start_new_session=True)
    return proc, tmp_path / "out.log"


def wait_for(text: str, path, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"never saw {text!r}: {path.read_text()[-2000:]}")


ARGS = ["--train-iters", "100000", "--seq-length", "32", "--micro-batch-size", "2", "--log-interval", "1"]


@pytest.mark.dist
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc, log = start([sys.executable, RECIPE, *ARGS, "--save", str(tmp_path / "ck")], tmp_path)
    wait_for("step      2", log, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-2000:]
    reader = CheckpointReader(tmp_path / "ck")
    assert 2 <= reader.manifest["step"] < 100000 and "SIGTERM" in log.read_text()


@pytest.mark.dist
def test_sigterm_on_one_rank_stops_every_rank(tmp_path):
    save = tmp_path / "ck2"
    cmd = [require_mpirun(), "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, RECIPE, *ARGS,
           "--pipeline-model-parallel-size", "2", "--save", str(save)]
    proc, log = start(cmd, tmp_path)
    wait_for("step      2", log, proc)
    ranks = subprocess.run(["pgrep", "-f", f"python.*{save}"], capture_output=True, text=True).stdout.split()
    ranks = [int(p) for p in ranks if int(p) != proc.pid]
    assert len(ranks) == 2, ranks
    os.kill(max(ranks), signal.SIGTERM)  # one rank only
    assert proc.wait(timeout=120) == 0, log.read_text()[-2000:]
    assert CheckpointReader(save).manifest["step"] >= 2


@pytest.mark.dist
def test_job_killed_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    """SIGKILL every rank while step 4's shards are on disk but its manifest is not: ``latest`` still names
    step 2, which loads, and --load resumes from it and finishes the run."""
    from moelib.train.checkpoint import STALL_ENV

    save = tmp_path / "ckpt"
    args = ["--precision", "fp32", "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "6",
            "--save-interval", "2", "--log-interval", "1", "--save", str(save)]
    cmd = [require_mpirun(), "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, RECIPE, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env({STALL_ENV: "4:300"}), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = save / ".iter_0000004.tmp"
    try:
        deadline = time.monotonic() + 240
        while not list(partial.glob("*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(partial.glob("*.safetensors")), "the save of step 4 never started"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (save / "latest").read_text().strip() == "iter_0000002"
    assert not (save / "iter_0000004").exists()
    reader = CheckpointReader(save)
    assert reader.manifest["step"] == 2 and all(reader.get(k).numel() > 0 for k in reader.keys())
    resume = [require_mpirun(), "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, RECIPE,
              *args, "--load", str(save)]
    done = subprocess.run(resume, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "at step 2" in done.stdout
    assert (save / "latest").read_text().strip() == "iter_0000006" and not partial.exists()
