"""recipes/v3_pretrain.py with held-out evaluation: it leaves training bit-identical, resumes exactly,
--eval-only reproduces a run's numbers under another layout, --global-batch-size sets the micro-batches,
and bad evaluation flags fail early with one sentence."""

import json
import re
import sys

import pytest
from _mpi import REPO, require_mpirun, run, worker_env

RECIPE = str(REPO / "recipes" / "v3_pretrain.py")
COMMON = ["--precision", "fp32", "--seq-length", "32", "--log-interval", "1", "--lr-warmup-iters", "2"]
PP2_EP2 = ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"]


def recipe(n: int, *args: str, ok: bool = True) -> tuple[int, str, str]:
    cmd = [sys.executable, RECIPE, *COMMON, *args]
    if n > 1:
        cmd = [require_mpirun(), "--allow-run-as-root", "--oversubscribe", "-n", str(n), *cmd]
    rc, out, err = run(cmd, 600, worker_env())
    if ok:
        assert rc == 0, err[-3000:]
    return rc, out, err


def rows(path) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) of a --log-json file."""
    all_rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in all_rows if "loss" in r], [r for r in all_rows if "loss" not in r]


@pytest.mark.dist
def test_evaluation_leaves_training_bit_identical_under_dualpipe_and_ep(tmp_path):
    common = [*PP2_EP2, "--micro-batch-size", "1", "--train-iters", "6", "--eval-iters", "1"]
    _, out, _ = recipe(4, *common, "--eval-interval", "2", "--save", str(tmp_path / "a"),
                       "--log-json", str(tmp_path / "a.jsonl"), "--tensorboard-dir", str(tmp_path / "tb"))
    recipe(4, *common[:-2], "--eval-iters", "0", "--save", str(tmp_path / "b"), "--log-json", str(tmp_path / "b.jsonl"))
    (train_a, held_a), (train_b, held_b) = rows(tmp_path / "a.jsonl"), rows(tmp_path / "b.jsonl")
    assert len(train_a) == 6 and [r["loss"] for r in train_a] == [r["loss"] for r in train_b] and held_b == []
    assert [(r["step"], "test_loss" in r) for r in held_a] == [(2, False), (4, False), (6, False), (6, True)]
    for key in ("valid_loss", "valid_ppl", "valid_mtp_loss", "valid_mtp_acc", "valid_max_vio"):
        assert all(isinstance(r[key], float) for r in held_a[:3]), key
    assert {"test_loss", "test_ppl", "test_mtp_loss", "test_mtp_acc", "test_max_vio"} <= held_a[3].keys()
    assert out.count("valid ") == 3 and "held-out: valid_loss" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("valid/loss")] == [2, 4, 6] and len(events.Scalars("test/loss")) == 1


@pytest.mark.dist
def test_resume_gives_the_same_training_and_held_out_losses_and_eval_only_reproduces_them(tmp_path):
    common = ["--micro-batch-size", "2", "--train-iters", "6", "--eval-interval", "2", "--eval-iters", "2"]
    recipe(1, *common, "--save", str(tmp_path / "a"), "--log-json", str(tmp_path / "a.jsonl"))
    recipe(1, *common, "--exit-interval", "4", "--save", str(tmp_path / "b"), "--log-json", str(tmp_path / "b.jsonl"))
    recipe(1, *common, "--save", str(tmp_path / "b"), "--load", str(tmp_path / "b"),
           "--log-json", str(tmp_path / "b.jsonl"))
    (train_a, held_a), (train_b, held_b) = rows(tmp_path / "a.jsonl"), rows(tmp_path / "b.jsonl")
    assert [r["loss"] for r in train_b] == [r["loss"] for r in train_a] and len(train_a) == 6
    values = lambda held: [(r["step"], {k: v for k, v in r.items() if k.startswith(("valid_", "test_"))}) for r in held]
    assert values(held_b) == values(held_a) and len(held_a) == 4
    # The final checkpoint evaluated alone on 2 ranks (EP 2): the same held-out batches (same global batch).
    _, out, _ = recipe(2, "--expert-model-parallel-size", "2", "--micro-batch-size", "1", "--global-batch-size", "2",
                       "--eval-only", "--eval-iters", "2", "--load", str(tmp_path / "a"),
                       "--log-json", str(tmp_path / "c.jsonl"))
    _, held_c = rows(tmp_path / "c.jsonl")
    assert "--eval-only" in out and [r["step"] for r in held_c] == [6, 6]
    for key in ("valid_loss", "valid_mtp_loss", "test_loss", "test_acc"):
        want = [r[key] for r in held_a if key in r][-1]  # the evaluation at the end of the run
        got = next(r[key] for r in held_c if key in r)
        assert abs(got - want) <= 1e-5 * abs(want), (key, got, want)


@pytest.mark.dist
def test_global_batch_size_trains_the_same_batches_on_one_and_two_ranks(tmp_path):
    common = ["--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3", "--eval-iters", "0"]
    _, out, _ = recipe(1, *common, "--save", str(tmp_path / "a"), "--log-json", str(tmp_path / "a.jsonl"))
    assert "1f1b, 4 micro-batches" in out
    _, out, _ = recipe(2, *common, "--expert-model-parallel-size", "2", "--save", str(tmp_path / "b"),
                       "--log-json", str(tmp_path / "b.jsonl"))
    assert "DP 2 (EP 2 x EDP 1), 1f1b, 2 micro-batches" in out
    (a, _), (b, _) = rows(tmp_path / "a.jsonl"), rows(tmp_path / "b.jsonl")
    assert len(a) == len(b) == 3
    assert all(abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]) for x, y in zip(a, b)), (a, b)


@pytest.mark.dist
@pytest.mark.parametrize("flags, message", [  # the flags' other rules: tests/unit/test_recipe_eval_flags.py
    (["--split", "969,30"], "--split 969,30: expected three non-negative weights"),
    (["--split", "100,0,0"], "--split 100,0,0 leaves the valid part empty while evaluation is requested"),
    (["--valid-data-path", "/nonexistent/valid"], "--valid-data-path /nonexistent/valid: no indexed dataset there"),
])
def test_bad_evaluation_and_batch_flags_fail_with_one_line_on_rank_0(flags, message):
    rc, _, err = recipe(2, "--train-iters", "1", *flags, ok=False)
    assert rc == 2
    lines = [line for line in err.splitlines() if re.match(r"v3_pretrain: (rank \d+: )?error:", line)]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err and "step " not in err


TINY2 = "model: {preset: tiny, num_hidden_layers: 2}\n"


@pytest.mark.dist
def test_a_finished_run_ends_with_a_greedy_sample_of_a_held_out_prompt(tmp_path):
    """The sample line is the saved checkpoint's own greedy continuation (moelib.generate, weights in bf16, the
    run's precision) of the valid part's first 32 tokens; --sample-tokens 0 and a stopped run print none."""
    import torch

    import moelib
    from moelib.inference.sample import HEADER
    from moelib.train.data import default_corpus
    from moelib.train.splits import DEFAULT_CORPUS_SPLIT, build_splits
    from moelib.train.tokenizer import Tokenizer

    rc, out, err = recipe(1, "--sample-tokens", "-1", "--save", str(tmp_path / "bad"), ok=False)
    assert rc == 2 and err.strip() == "v3_pretrain: error: --sample-tokens must be 0 (off) or positive, got -1", err
    assert "Traceback" not in err and "step " not in out
    (tmp_path / "tiny2.yaml").write_text(TINY2)
    common = ["--config", str(tmp_path / "tiny2.yaml"), "--micro-batch-size", "2", "--train-iters", "2",
              "--eval-iters", "1", "--peak-tflops", "1", "--precision", "bf16"]
    _, out, _ = recipe(1, *common, "--save", str(tmp_path / "a"), "--sample-tokens", "8")
    lines = [line for line in out.splitlines() if line.startswith(HEADER)]
    assert len(lines) == 1, out
    prefix, tokenizer_path = default_corpus(4096)
    tok = Tokenizer.from_file(tokenizer_path)
    valid = build_splits(prefix, 32, eod_id=tok.eod, vocab_size=4096, split=None,
                         default_split=DEFAULT_CORPUS_SPLIT)["valid"]
    prompt = [int(t) for t in valid[0][:32]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the recipe's rank (OMP_NUM_THREADS=1): the same bf16 sums
    try:
        new = moelib.generate(moelib.load_model(tmp_path / "a", "bf16"), [prompt], 8).tokens[0, 32:].tolist()
    finally:
        torch.set_num_threads(threads)
    assert len(new) == 8
    assert lines[0] == f"{HEADER}{tok.decode(prompt)!r} | {tok.decode(new)!r}"
    for name, flags in (("off", ["--sample-tokens", "0"]), ("stopped", ["--exit-interval", "1"])):
        _, out, _ = recipe(1, *common, "--save", str(tmp_path / name), *flags)
        assert "checkpoint:" in out and HEADER not in out, out
