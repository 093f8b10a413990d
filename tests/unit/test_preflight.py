"""Start-up checks (moelib.train.preflight) and the wall-clock save timer: each refusal is one sentence
naming the flag, and nothing is refused that would work."""

import json
import time

import pytest
import torch

from moelib import ModelConfig, TrainConfig
from moelib.errors import ConfigError
from moelib.model import build_model
from moelib.train import preflight
from moelib.train.faults import SaveTimer, agree


def test_checkpoint_estimate_covers_what_a_save_writes():
    """fp32 weights + two moments per parameter (+ EMA): at least the bytes of the real tensors."""
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=2)
    params = sum(p.numel() for p in build_model(cfg, "fp32", device="meta").parameters())
    assert preflight.checkpoint_bytes(cfg, TrainConfig()) == params * 12
    assert preflight.checkpoint_bytes(cfg, TrainConfig(moment_dtype="bf16", ema_decay=0.9)) == params * 12


def test_save_dir_is_created_and_probed(tmp_path):
    preflight.check_save_dir(tmp_path / "a" / "b", 1)
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^--save .*file/ck: cannot write there \(Not a directory\)$"):
        preflight.check_save_dir(tmp_path / "file" / "ck", 1)
    with pytest.raises(ConfigError, match=r"MiB free, but one checkpoint needs about"):
        preflight.check_save_dir(tmp_path, 2**62)


def test_output_file_and_dir_are_opened_now(tmp_path):
    (tmp_path / "file").write_text("")
    preflight.check_output_file(tmp_path / "logs" / "run.jsonl", "--log-json")
    assert (tmp_path / "logs" / "run.jsonl").read_text() == ""
    with pytest.raises(ConfigError, match=r"^--log-json .*: cannot open for appending \(Not a directory\)$"):
        preflight.check_output_file(tmp_path / "file" / "run.jsonl", "--log-json")
    with pytest.raises(ConfigError, match=r"^--tensorboard-dir .*: cannot write there"):
        preflight.check_output_dir(tmp_path / "file" / "tb", "--tensorboard-dir")


def test_negative_intervals_are_refused():
    preflight.check_intervals(save_interval=0, keep_last=3, log_interval=None)
    with pytest.raises(ConfigError, match=r"^--exit-interval must be 0 \(off\) or positive, got -2$"):
        preflight.check_intervals(save_interval=5, exit_interval=-2)


def test_fp8_triton_without_gpu_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp8-triton is allowed here")
    with pytest.raises(ConfigError, match="--precision fp8-triton needs a CUDA GPU"):
        preflight.check_device("fp8-triton")
    preflight.check_device("fp8-emulated")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # tests run the kernels in the interpreter on purpose
    preflight.check_device("fp8-triton")


def write_run(save, step: int, run: dict) -> None:
    (save / f"iter_{step:07d}").mkdir(parents=True)
    (save / f"iter_{step:07d}" / "manifest.json").write_text(json.dumps({"step": step, "run": run}))
    (save / "latest").write_text(f"iter_{step:07d}\n")


def test_another_runs_save_is_refused_naming_the_difference(tmp_path):
    mine = {"model": {"hidden_size": 64}, "train": {"train_iters": 2, "lr": 1e-3}}
    preflight.check_save_owner(tmp_path, mine, resumes_it=False)  # empty: fine
    write_run(tmp_path, 300, {"model": {"hidden_size": 64}, "train": {"train_iters": 300, "lr": 1e-3}})
    with pytest.raises(ConfigError, match=r"already holds the checkpoints of a run with another config "
                                          r"\(train\.train_iters 300 vs 2\), up to step 300; resume it with --load"):
        preflight.check_save_owner(tmp_path, mine, resumes_it=False)
    preflight.check_save_owner(tmp_path, mine, resumes_it=True)  # resuming it: its own directory
    same = {"model": {"hidden_size": 64}, "train": {"train_iters": 300, "lr": 1e-3}}
    with pytest.raises(ConfigError, match="checkpoints of this config's run, up to step 300"):
        preflight.check_save_owner(tmp_path, same, resumes_it=False)


def test_differences_walks_nested_fields():
    a = {"train": {"lr": 1, "precision": {"backend": "bf16"}}, "model": {"n": 2}}
    b = {"train": {"lr": 1, "precision": {"backend": "fp32"}}, "model": {"n": 4}}
    assert preflight.differences(a, b) == ["model.n 2 vs 4", "train.precision.backend 'bf16' vs 'fp32'"]


def test_save_timer_and_single_process_agreement():
    assert SaveTimer(0).due() is False
    timer = SaveTimer(1e-5)  # 0.6 ms
    time.sleep(0.01)
    assert timer.due()
    timer.saved()
    assert not SaveTimer(10).due()
    assert agree(True, False) == [True, False]


def test_raising_train_iters_on_resume_is_said(capsys):
    """recipes/v3_pretrain.py::warn_if_reshaped names the old and new --train-iters and the reshaped schedule."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("v3_pretrain", Path(__file__).resolve().parents[2] / "recipes"
                                                  / "v3_pretrain.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    manifest, main = {"run": {"train": {"train_iters": 300}}}, SimpleNamespace(is_main=True)
    recipe.warn_if_reshaped(manifest, 300, main)
    assert capsys.readouterr().err == ""
    recipe.warn_if_reshaped(manifest, 1000, main)
    assert capsys.readouterr().err == ("v3_pretrain: warning: --train-iters 1000 differs from the checkpoint's run "
                                       "(300); the LR and other schedules are reshaped to span 1000 steps from "
                                       "here on\n")
