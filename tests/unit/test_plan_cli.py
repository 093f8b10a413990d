"""tools/plan.py: the JSON a user scripts against, and bad input reported in one sentence naming the flag."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moelib.errors import ConfigError
from tools.plan import main, parse_tokens

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def activation_cache(tmp_path_factory):
    """One measurement of tiny's layers for the module, in a cache of its own (not the user's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOELIB_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield
TINY = ["--config", "tiny", "--gpus", "4", "--gpu", "h100", "--pp", "2", "--ep", "2", "--global-batch-size", "8",
        "--seq-length", "64", "--activation-seq", "32"]


def test_json_has_every_figure_and_a_memory_row_per_table_row(capsys):
    assert main([*TINY, "--json", "--tokens", "1B"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True
    rows = {"master_weights", "compute_weights", "gradients", "optimizer", "activations"}
    assert set(out["memory_bytes"]) == rows | {"total"}
    assert out["memory_bytes"]["total"] == pytest.approx(sum(out["memory_bytes"][r] for r in rows))
    for key in ("step_time_s", "tokens_per_s", "mfu", "gpu_hours", "one_to_one_efficiency"):
        assert out[key] > 0, key
    assert out["step_time_s"] == pytest.approx(out["pipeline_s"] + sum(out["update_s"].values()))
    # PP 2 under DualPipe: each rank holds both stages, so (PP/2 - 1) x ... = no bubble
    assert out["bubble_fraction"] == pytest.approx(0.0, abs=1e-12) and 0 <= out["exposed_comm_fraction"] < 1
    assert out["table2_bubble_s"] == 0 and out["max_rank_idle_s"] == pytest.approx(0.0, abs=1e-12)
    assert out["compute_to_comm"] > 0
    assert out["gpu_hours"] == pytest.approx(4 * 1e9 / out["tokens_per_s"] / 3600)


def test_target_gpu_hours_finds_the_efficiency_that_meets_it(capsys):
    assert main([*TINY, "--json"]) == 0  # 1T tokens at the default efficiency
    slower = 2 * json.loads(capsys.readouterr().out)["gpu_hours"]
    assert main([*TINY, "--json", "--target-gpu-hours", str(slower)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["implied"]["gpu_hours"] == pytest.approx(slower, rel=1e-3)
    assert out["implied"]["efficiency"] < out["efficiency"] and out["implied"]["mfu"] < out["mfu"]


@pytest.mark.parametrize("extra, phrase", [
    (["--pp", "3"], "--pp: 3 does not divide --gpus 4"),
    (["--ep", "3", "--gpus", "6", "--pp", "1", "--global-batch-size", "6"], "--ep: 3 does not divide the model's 16"),
    (["--ep", "4"], "--ep: 4 does not divide the data-parallel size 2"),
    (["--gpu", "a100"], "--gpu: unknown GPU preset 'a100'"),
    (["--gpus-per-node", "3"], "--ep: 2 cuts nodes of 3 GPUs (--gpus-per-node) unevenly"),
    (["--comm-sms", "140"], "--comm-sms: 140 leaves none of the GPU's 132 SMs (--sms)"),
    (["--hbm-tbps", "0"], "--hbm-tbps: must be positive, got 0"),
    (["--hbm-gb", "0.01"], "memory: the layout needs"),
    (["--global-batch-size", "6"], "--global-batch-size: dualpipe needs an even number"),
    (["--tokens", "lots"], "--tokens: 'lots' is not a positive token count"),
])
def test_bad_input_is_one_sentence_naming_the_flag(extra, phrase):
    with pytest.raises(ConfigError) as info:
        main([*TINY, *extra])
    assert str(info.value).startswith(phrase) and "\n" not in str(info.value)


def test_cli_exits_non_zero_without_traceback():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "plan.py"), *TINY, "--pp", "3"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "plan: error: --pp: 3 does not divide --gpus 4"


def test_a_recipe_yaml_gives_the_same_plan_as_its_preset(capsys):
    assert main([*TINY, "--json"]) == 0
    by_preset = json.loads(capsys.readouterr().out)
    assert main([*TINY, "--json", "--config", str(REPO / "recipes" / "configs" / "tiny.yaml")]) == 0
    assert json.loads(capsys.readouterr().out) == by_preset
    with pytest.raises(ConfigError, match="^--config: 'tinyy' is neither a model preset nor a recipe .yaml file$"):
        main([*TINY, "--config", "tinyy"])


def test_token_counts_take_suffixes():
    assert parse_tokens("14.8T") == pytest.approx(14.8e12)
    assert parse_tokens("500B") == 5e11 and parse_tokens("2M") == 2e6 and parse_tokens("1000") == 1000


def test_measured_kernel_rates_set_the_efficiency(tmp_path, capsys):
    # two GEMMs of equal work at 1000 and 500 TFLOP/s: 2 units of work in 1/1000 + 1/500 -> 666.7 TFLOP/s
    gemms = [{"name": "a", "m": 4096, "n": 2048, "k": 7168, "tflops": 1000.0, "bf16_tflops": 600.0},
             {"name": "b", "experts": 2, "m_per_expert": 2048, "n": 2048, "k": 7168, "tflops": 500.0}]
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"device": "cuda", "smoke": False, "gemm": gemms[:1], "grouped_gemm": gemms[1:]}))
    assert main([*TINY, "--json", "--kernels", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["efficiency"] == pytest.approx(2000 / 3 / 1979)
    assert main([*TINY, "--json", "--kernels", str(path), "--precision", "bf16"]) == 0
    assert json.loads(capsys.readouterr().out)["efficiency"] == pytest.approx(600 / 989)


def test_a_smoke_kernels_run_is_refused(tmp_path):
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps({"device": "cpu", "smoke": True, "gemm": []}))
    with pytest.raises(ConfigError, match="^--kernels: .* is a --smoke or CPU run"):
        main([*TINY, "--kernels", str(path)])
