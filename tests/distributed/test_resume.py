"""Stop and --load: the resumed run reproduces the uninterrupted one's losses step for step (same layout,
fp32, CPU), and a checkpoint written under one layout loads under another."""

import json
import sys

import pytest
import torch
from _mpi import REPO, require_mpirun, run, worker_env

from moelib.train.checkpoint import load_checkpoint  # noqa: E402

RECIPE = str(REPO / "recipes" / "v3_pretrain.py")
COMMON = ["--precision", "fp32", "--seq-length", "32", "--micro-batch-size", "2", "--log-interval", "1",
          "--lr-warmup-iters", "2"]


def recipe(n: int, *args: str) -> None:
    cmd = [sys.executable, RECIPE, *COMMON, *args]
    if n > 1:
        cmd = [require_mpirun(), "--allow-run-as-root", "--oversubscribe", "-n", str(n), *cmd]
    rc, out, err = run(cmd, 600, worker_env())
    assert rc == 0, err[-3000:]


def losses(path) -> list[float]:
    return [r["loss"] for line in path.read_text().splitlines() if "loss" in (r := json.loads(line))]


# V3's optimizer state (bf16 moments) and a parameter EMA must resume exactly too, and load under another layout.
PP2_EP2 = ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--moment-dtype", "bf16",
           "--ema-decay", "0.9"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """``runs(ranks, layout) -> dir``: the uninterrupted 4-step run in dir/a and one stopped at step 2 by
    --exit-interval in dir/b (the schedules still span the 4 steps: they scale with --train-iters), once per
    layout; both tests below read the 4-rank one."""
    found = {}

    def runs(ranks: int, layout: list[str]):
        key = (ranks, tuple(layout))
        if key not in found:
            tmp = found[key] = tmp_path_factory.mktemp("resume")
            recipe(ranks, *layout, "--train-iters", "4", "--save", str(tmp / "a"), "--log-json", str(tmp / "a.jsonl"))
            recipe(ranks, *layout, "--train-iters", "4", "--exit-interval", "2", "--save", str(tmp / "b"),
                   "--log-json", str(tmp / "b.jsonl"))
        return found[key]
    return runs


@pytest.mark.dist
@pytest.mark.parametrize("ranks, layout", [(1, []), (4, PP2_EP2)])
def test_stop_and_resume_gives_identical_losses(stopped_run, ranks, layout):
    tmp = stopped_run(ranks, layout)
    recipe(ranks, *layout, "--train-iters", "4", "--save", str(tmp / "b"), "--load", str(tmp / "b"),
           "--log-json", str(tmp / "b.jsonl"))
    assert losses(tmp / "b.jsonl") == losses(tmp / "a.jsonl")
    assert len(losses(tmp / "a.jsonl")) == 4
    (_, a), (manifest, b) = load_checkpoint(tmp / "a"), load_checkpoint(tmp / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
    if "--ema-decay" in layout:
        params = {k for k in a if not k.startswith(("optimizer.", "rng.", "ema.")) and "e_score" not in k}
        assert {k.removeprefix("ema.") for k in a if k.startswith("ema.")} == params
        assert manifest["train"]["ema"] == {"decay": 0.9, "step": 4}
        assert a["optimizer.exp_avg.embed_tokens.weight"].dtype == torch.bfloat16


@pytest.mark.dist
def test_checkpoint_loads_under_another_layout(stopped_run, tmp_path):
    """Written by PP 2 x EP 2 DualPipe on 4 ranks (bf16 moments, EMA) at step 2, continued on 2 ranks with EP 2
    and no pipeline: the continued losses follow the uninterrupted run's to fp32 reduction-order noise (same
    global batch: 16)."""
    tmp = stopped_run(4, PP2_EP2)
    recipe(2, "--expert-model-parallel-size", "2", "--num-microbatches", "4", "--train-iters", "4",
           "--moment-dtype", "bf16", "--ema-decay", "0.9", "--load", str(tmp / "b" / "iter_0000002"),
           "--save", str(tmp_path / "c"), "--log-json", str(tmp_path / "c.jsonl"))
    reference, continued = losses(tmp / "a.jsonl")[2:], losses(tmp_path / "c.jsonl")
    assert len(continued) == 2
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(continued, reference)), (continued, reference)
