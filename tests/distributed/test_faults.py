"""Faults: a non-finite step is skipped (and too many in a row stop the run); SIGTERM on any rank saves a
checkpoint on every rank and exits cleanly. The fault matrix (below) runs the recipe under mpirun (4 ranks
where a rank is stopped or signalled; 2 where one rank's input or the run's flags are bad, which shows the
same at half the start-up cost) and asserts what the user sees: the failing rank's one sentence on stderr and
a prompt non-zero exit."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _mpi import REPO, require_mpirun, run_mpi, worker_env

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


# -- the fault matrix: mpirun -n 4, the tiny model with 2 layers --------------------------------------------

TINY = """model: {preset: tiny, num_hidden_layers: 2}
train: {micro_batch_size: 2, seq_length: 32, train_iters: 6, lr: 3.0e-3, min_lr: 3.0e-4, lr_warmup_iters: 2,
        seed: 1234, log_interval: 1, precision: {backend: fp32}}
"""
MPIRUN = ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]


def tiny_config(tmp_path: Path) -> str:
    (tmp_path / "tiny2.yaml").write_text(TINY)
    return str(tmp_path / "tiny2.yaml")


def recipe_cmd(tmp_path: Path, *args: str, n: int = 4, last_rank_args: tuple[str, ...] | None = None) -> list[str]:
    """mpirun -n N python v3_pretrain.py ...; with ``last_rank_args`` the last rank gets them appended (an MPMD
    launch: one rank sees a different file, as a node with a bad copy of the data would)."""
    rank = [sys.executable, RECIPE, "--config", tiny_config(tmp_path), "--peak-tflops", "1", *args]
    if last_rank_args is None:
        return [require_mpirun(), *MPIRUN, "-n", str(n), *rank]
    return [require_mpirun(), *MPIRUN, "-n", str(n - 1), *rank, ":", "-n", "1", *rank, *last_rank_args]


def run_timed(cmd: list[str], timeout: float = 240, env: dict | None = None):
    """(rc, stdout, stderr, seconds)."""
    began = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, env=worker_env(env), capture_output=True, text=True, timeout=timeout,
                          errors="replace")
    return done.returncode, done.stdout, done.stderr, time.monotonic() - began


def error_lines(err: str) -> list[str]:
    """The recipe's error lines; mpirun's own notices must not come first."""
    lines = [line for line in err.splitlines() if line.startswith("v3_pretrain: rank ") and ": error: " in line]
    assert not lines or err.index(lines[0]) < err.find("MPI_ABORT was invoked") or "MPI_ABORT" not in err, err
    return lines


def corpus_copy(tmp_path: Path, name: str) -> Path:
    from moelib.train.data import default_corpus

    prefix, _ = default_corpus(4096)
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, tmp_path / f"{name}{ext}")
    return tmp_path / name


def corrupt(kind: str, prefix: Path) -> None:
    if kind == "missing":
        (prefix.with_suffix(".idx")).unlink()
    elif kind == "truncated":
        data = prefix.with_suffix(".bin").read_bytes()
        prefix.with_suffix(".bin").write_bytes(data[: len(data) // 2])
    else:  # token ids beyond the vocabulary, everywhere in this copy
        size = prefix.with_suffix(".bin").stat().st_size
        prefix.with_suffix(".bin").write_bytes(b"\xff" * size)


@pytest.mark.dist
@pytest.mark.parametrize("kind, cause", [("missing", "does not exist"), ("truncated", "is shorter than its index"),
                                         ("corrupt", "outside the")])
def test_bad_data_on_one_rank_is_named_by_that_rank(tmp_path, kind, cause):
    """Rank 0 reads a good corpus, rank 1 a missing, truncated or corrupt copy: rank 1's sentence reaches
    the user (it alone knows), then the job ends non-zero well before the collective timeout."""
    good, bad = corpus_copy(tmp_path, "good"), corpus_copy(tmp_path, "bad")
    corrupt(kind, bad)
    from moelib.train.data import default_corpus

    tok = default_corpus(4096)[1]
    cmd = recipe_cmd(tmp_path, "--save", str(tmp_path / "ck"), "--tokenizer", tok, "--data-path", str(good),
                     n=2, last_rank_args=("--data-path", str(bad)))
    rc, out, err, seconds = run_timed(cmd, env={"MOELIB_COLLECTIVE_TIMEOUT": "120"})
    lines = error_lines(err)
    assert rc != 0 and lines and all(line.startswith("v3_pretrain: rank 1: error: ") for line in lines), err[-3000:]
    assert cause in lines[0] and str(bad) in lines[0] and "Traceback" not in err
    assert seconds < 100, seconds  # not a wait for the 120 s collective timeout


@pytest.mark.dist
def test_hung_rank_is_named_by_the_collective_timeout(tmp_path):
    """Rank 2 stops (SIGSTOP) after step 2: the others' collective times out after 5 s and the error names
    the operation and rank 2; the job ends non-zero within seconds of that."""
    save = tmp_path / "ck"
    proc, log = start(recipe_cmd(tmp_path, "--train-iters", "1000", "--collective-timeout", "5", "--save", str(save)),
                      tmp_path)
    wait_for("step      2", log, proc)
    ranks = {}
    for pid in subprocess.run(["pgrep", "-f", f"python.*{save}"], capture_output=True, text=True).stdout.split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"OMPI_COMM_WORLD_RANK=")]
        if rank:
            ranks[int(rank[0])] = int(pid)
    assert sorted(ranks) == [0, 1, 2, 3], ranks
    os.kill(ranks[2], signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    text = log.read_text(errors="replace")
    lines = error_lines(text)
    assert rc != 0 and lines, text[-3000:]
    assert "timed out after 5 s" in lines[0] and "rank(s) 2 did not arrive" in lines[0], lines
    assert "a collective in 'train step" in lines[0] or "agreement" in lines[0], lines
    assert time.monotonic() - stopped < 60


@pytest.mark.dist
@pytest.mark.parametrize("flag, value, cause", [
    ("--save", "{tmp}/a_file/ck", "--save {tmp}/a_file/ck: cannot write there"),
    ("--log-json", "{tmp}/a_file/log.jsonl", "--log-json {tmp}/a_file/log.jsonl: cannot open for appending"),
    ("--tensorboard-dir", "{tmp}/a_file/tb", "--tensorboard-dir {tmp}/a_file/tb: cannot write there"),
])
def test_unwritable_output_fails_before_any_work(tmp_path, flag, value, cause):
    """An output path under a regular file (unwritable even for root) fails at start-up, before the model is
    built or a step runs: the sentence names the flag, and no training line is printed."""
    (tmp_path / "a_file").write_text("")
    args = ["--save", str(tmp_path / "ck")] if flag != "--save" else []
    rc, out, err, seconds = run_timed(recipe_cmd(tmp_path, *args, flag, value.format(tmp=tmp_path), n=2))
    lines = error_lines(err)
    assert rc != 0 and lines and cause.format(tmp=tmp_path) in lines[0], err[-3000:]
    assert "step " not in out and "parameters" not in out, out


@pytest.mark.dist
def test_two_runs_with_different_configs_do_not_mix_in_one_save(tmp_path):
    """A second run with another --train-iters refuses the first run's --save, naming the difference;
    ``latest`` still names the first run's checkpoint. A --load with another model names the field."""
    save = tmp_path / "ck"
    rc, out, err, _ = run_timed(recipe_cmd(tmp_path, "--train-iters", "2", "--save", str(save), n=2))
    assert rc == 0, err[-3000:]
    rc, out, err, _ = run_timed(recipe_cmd(tmp_path, "--train-iters", "3", "--save", str(save), n=2))
    lines = error_lines(err)
    assert rc != 0 and lines and f"--save {save} already holds the checkpoints of a run with another config " \
        "(train.train_iters 2 vs 3)" in lines[0], err[-3000:]
    assert (save / "latest").read_text().strip() == "iter_0000002" and not (save / "iter_0000003").exists()
    rc, out, err, _ = run_timed(recipe_cmd(tmp_path, "--config", "tiny", "--load", str(save), "--save",
                                           str(tmp_path / "other"), "--train-iters", "3", n=2))
    lines = error_lines(err)
    assert rc != 0 and lines and "the checkpoint's model config differs" in lines[0], err[-3000:]
    assert "num_hidden_layers 2 there, 4 here" in lines[0], lines


def losses(path: Path) -> list[float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]  # held-out rows carry valid_*/test_* keys instead


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    """An uninterrupted 6-step run; it also saves every step by wall time (--save-interval-minutes)."""
    tmp = tmp_path_factory.mktemp("reference")
    rc, out, err, _ = run_timed(recipe_cmd(tmp, "--save", str(tmp / "ck"), "--log-json", str(tmp / "a.jsonl"),
                                           "--save-interval-minutes", "1e-6", "--keep-last", "0"))
    assert rc == 0, err[-3000:]
    assert sorted(p.name for p in (tmp / "ck").glob("iter_*")) == [f"iter_000000{i}" for i in range(1, 7)]
    return losses(tmp / "a.jsonl")


@pytest.mark.dist
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_mpirun_saves_and_resumes_exactly(tmp_path, sig, reference_losses):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler) to mpirun, run as ``python -m moelib.parallel.mpirun``: every
    rank saves after its step and the job exits 0; --load continues with the uninterrupted run's losses."""
    save, log_json = tmp_path / "ck", tmp_path / "b.jsonl"
    rank = [sys.executable, RECIPE, "--config", tiny_config(tmp_path), "--peak-tflops", "1", "--save", str(save),
            "--log-json", str(log_json)]
    proc, log = start([sys.executable, "-m", "moelib.parallel.mpirun", *MPIRUN, "-n", "4", *rank], tmp_path)
    wait_for("step      2", log, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    stopped_at = CheckpointReader(save).manifest["step"]
    assert 2 <= stopped_at < 6, log.read_text()[-3000:]
    assert f"{sig.name}: every rank saves" in log.read_text() and "SIGUSR1 on some rank" in log.read_text()
    rc, out, err, _ = run_timed([require_mpirun(), *MPIRUN, "-n", "4", *rank, "--load", str(save)])
    assert rc == 0, err[-3000:]
    assert losses(log_json) == reference_losses


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["bug", "error"])
def test_one_failing_rank_is_reported_with_its_rank(mode):
    """A bug on rank 1 prints its traceback, each line prefixed with the rank; a moelib error its one
    sentence. The others, waiting in an all-reduce for rank 1 (120 s timeout), add nothing and the job ends
    non-zero within seconds."""
    began = time.monotonic()
    rc, out, err = run_mpi(3, "failing_rank.py", mode, timeout=100)
    assert rc not in (0, -9) and time.monotonic() - began < 90, (rc, err)
    mine = [line for line in err.splitlines() if line.startswith("failing_rank: ")]
    assert mine and all(line.startswith("failing_rank: rank 1: ") for line in mine), err
    if mode == "bug":
        assert mine[0] == "failing_rank: rank 1: Traceback (most recent call last):" and \
            mine[-1] == "failing_rank: rank 1: IndexError: list index out of range", mine
    else:
        assert mine == ["failing_rank: rank 1: error: shard 7 of the corpus is truncated"]
