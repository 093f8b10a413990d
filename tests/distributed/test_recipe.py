"""recipes/v3_pretrain.py under mpirun: it trains, writes one layout-free checkpoint, and bad flags fail early."""

import json
import re
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
    rows = [r for r in rows if "loss" in r]  # training rows (held-out evaluations write their own)
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


# Parameters of a 16-rank run against one process's, relative norm per tensor: tests/distributed/
# test_pipeline_parity.py's bound (the embedding's rows sum in another order; a lost micro-batch gives 0.59).
PARAM_TOL = 5e-5


@pytest.mark.dist
@pytest.mark.slow
def test_sixteen_ranks_default_layout_trains_as_one_process(tmp_path):
    """16 ranks without layout flags get V3's shape, PP 2 (DualPipe) x DP 8 with EP 8, and train as one
    process does on the same global batch (32 sequences): the same losses and parameters. One 16-rank launch
    shows both the recipe's default layout and DualPipe x EP x DP parity at 16 ranks."""
    flags = ["--precision", "fp32", "--seq-length", "32", "--train-iters", "2", "--lr-warmup-iters", "1",
             "--log-interval", "1", "--eval-iters", "0", "--sample-tokens", "0", "--peak-tflops", "1"]
    rc, out, err = mpirun_recipe(16, *flags, "--micro-batch-size", "1", "--save", str(tmp_path / "a"),
                                 "--log-json", str(tmp_path / "a.jsonl"))
    assert rc == 0, err[-3000:]
    step_lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert "16 rank(s): PP 2 x DP 8 (EP 8 x EDP 1), dualpipe, 4 micro-batches" in out and len(step_lines) == 2, out
    rc, out, err = mpirun_recipe(1, *flags, "--micro-batch-size", "32", "--save", str(tmp_path / "b"),
                                 "--log-json", str(tmp_path / "b.jsonl"))
    assert rc == 0, err[-3000:]
    dist_rows, single_rows = ([r for line in (tmp_path / f"{x}.jsonl").read_text().splitlines()
                               if "loss" in (r := json.loads(line))] for x in "ab")
    assert [r["batch_size"] for r in dist_rows] == [r["batch_size"] for r in single_rows] == [32, 32]
    for a, b in zip(dist_rows, single_rows, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a["loss"], b["loss"])
    (_, got), (_, want) = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    names = [k for k in want if not k.startswith(("optimizer.", "rng."))]
    assert names and set(names) <= got.keys()
    for k in names:
        err = float((got[k].double() - want[k].double()).norm() / (want[k].double().norm() + 1e-12))
        assert err <= PARAM_TOL, (k, err)


@pytest.mark.dist
@pytest.mark.parametrize("flags, message", [
    (["--pipeline-model-parallel-size", "3"], "world size 2 is not divisible by pipeline size 3"),
    (["--expert-model-parallel-size", "3"], "expert-parallel size 3"),
    (["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipe", "--num-microbatches", "3"],
     "micro-batches"),
    (["--data-path", "/nonexistent/corpus"], "Indexed dataset file /nonexistent/corpus.idx does not exist"),
    (["--data-path", "/nonexistent/corpus", "--tokenizer", "/nonexistent/tok.json"],
     "Tokenizer file /nonexistent/tok.json does not exist"),
    (["--lr", "-1"], "TrainConfig.lr: must be a positive number"),
    (["--micro-batch-size", "2", "--global-batch-size", "16", "--rampup-batch-size", "6", "2", "10"],
     "--rampup-batch-size INCREMENT 2 must be a multiple of 4 (micro-batch size 2 x data-parallel size 2)"),
    (["--pipeline-model-parallel-size", "2", "--micro-batch-size", "1", "--rampup-batch-size", "2", "2", "10"],
     "--rampup-batch-size: a batch of 2 sequences gives 2 micro-batches per data-parallel rank, which the pipeline "
     "rejects: ParallelConfig.num_microbatches: dualpipe needs at least 2 x pipeline size = 4 micro-batches, got 2"),
])
def test_bad_layout_fails_with_one_line(flags, message, tmp_path):
    """Every rank fails alike; the user reads the sentence once, from whichever rank said it first (2 ranks
    show that as well as 4, at half the start-up cost)."""
    rc, out, err = mpirun_recipe(2, "--train-iters", "1", "--save", str(tmp_path), *flags, timeout=120)
    assert rc != 0
    lines = [line for line in err.splitlines() if re.match(r"v3_pretrain: rank \d: error: ", line)]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err


@pytest.mark.dist
def test_batch_ramp_and_token_schedules_match_one_process(tmp_path):
    """--rampup-batch-size: DualPipe on 4 ranks runs each step with as many micro-batches as the ramp's batch
    needs and follows the single-process run's losses; LR, λ and γ are the token-driven schedules'."""
    flags = ["--precision", "fp32", "--seq-length", "32", "--micro-batch-size", "1", "--train-iters", "6",
             "--lr-warmup-iters", "2", "--log-interval", "1", "--global-batch-size", "16",
             "--rampup-batch-size", "8", "4", "40"]
    rc, _, err = mpirun_recipe(4, *flags, "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                               "--num-microbatches", "8", "--save", str(tmp_path / "a"),
                               "--log-json", str(tmp_path / "a.jsonl"))
    assert rc == 0, err[-3000:]
    rc, _, err = mpirun_recipe(1, *flags, "--num-microbatches", "16", "--save", str(tmp_path / "b"),
                               "--log-json", str(tmp_path / "b.jsonl"))
    assert rc == 0, err[-3000:]
    dist_rows, single_rows = ([r for line in (tmp_path / f"{x}.jsonl").read_text().splitlines()
                               if "loss" in (r := json.loads(line))] for x in "ab")
    from moelib import TrainConfig
    from moelib.train.schedules import Schedules, schedule_for_run

    cfg = schedule_for_run(TrainConfig(seq_length=32, micro_batch_size=1, train_iters=6, lr_warmup_iters=2), 16,
                           rampup=(8, 4, 40))
    schedules = Schedules(cfg)
    expected = [schedules.step() for _ in range(6)]
    assert [r["batch_size"] for r in dist_rows] == [v.batch_size for v in expected] == [8, 8, 8, 12, 12, 16]
    for rows in (dist_rows, single_rows):
        assert [r["lr"] for r in rows] == [v.lr for v in expected]
        assert [r["mtp_weight"] for r in rows] == [v.mtp_weight for v in expected]
        assert [r["bias_update_speed"] for r in rows] == [v.bias_update_speed for v in expected]
    for a, b in zip(dist_rows, single_rows):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a["loss"], b["loss"])


@pytest.mark.dist
def test_full_recompute_under_dualpipe_and_ep_gives_identical_losses(tmp_path):
    """--recompute full reruns MoE layers (their all-to-alls too) inside DualPipe's overlapped backward;
    the losses must not move by a bit."""
    losses = {}
    for mode in ("none", "full"):
        rc, _, err = mpirun_recipe(4, "--precision", "fp32", "--seq-length", "32", "--micro-batch-size", "2",
                                   "--train-iters", "3", "--pipeline-model-parallel-size", "2",
                                   "--expert-model-parallel-size", "2", "--recompute", mode, "--log-interval", "1",
                                   "--save", str(tmp_path / mode), "--log-json", str(tmp_path / f"{mode}.jsonl"))
        assert rc == 0, err[-3000:]
        rows = [json.loads(line) for line in (tmp_path / f"{mode}.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["none"]) == 3 and losses["full"] == losses["none"]
