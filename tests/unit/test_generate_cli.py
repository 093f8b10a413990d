"""tools/generate.py: streams text from an HF directory with its tokenizer; bad input exits 1 with one line."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _hf import write_hf

from moelib import ModelConfig
from moelib.model import build_model
from moelib.train.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "generate.py"
TEXT = ["the cat sat on the mat and the dog sat on the log"] * 20
DIMS = dict(vocab_size=266, hidden_size=32, num_hidden_layers=2, intermediate_size=48, num_attention_heads=2,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, moe_intermediate_size=16,
            max_position_embeddings=48)


def hf_dir(path: Path, **overrides) -> Path:
    cfg = ModelConfig.from_preset("tiny", **{**DIMS, **overrides})
    write_hf(build_model(cfg, "fp32", seed=0), path)
    train_bpe(TEXT, 300, save_path=path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    return hf_dir(root / "mtp"), hf_dir(root / "plain", num_nextn_predict_layers=0)


def run_tool(argv: list[str], capfd) -> tuple[int, str, str]:
    """tools/generate.py as `python tools/generate.py ARGV` runs it (its __main__ block), in this process."""
    old = sys.argv
    sys.argv = [str(TOOL), *argv]
    try:
        runpy.run_path(str(TOOL), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    out, err = capfd.readouterr()
    return code, out, err


def test_streams_text_and_reports_speed_acceptance_and_cache(dirs, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("zebra")  # bytes only: ids below 257
    proc = subprocess.run([sys.executable, str(TOOL), "--load", str(dirs[0]), "--prompt-file", str(prompt),
                           "--max-new-tokens", "12", "--speculative", "mtp", "--temperature", "0.9", "--seed", "3"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert "tokens/s" in last and "MTP acceptance" in last
    assert f"KV cache {2 * (16 + 8) * 4} bytes/token" in last


BAD = {
    "prompt too long": (["--prompt", "the cat sat " * 12, "--max-new-tokens", "40"], "max_position_embeddings"),
    "empty prompt": (["--prompt", ""], "--prompt"),
    "negative temperature": (["--prompt", "the", "--temperature", "-1"], "--temperature"),
    "top_p zero": (["--prompt", "the", "--top-p", "0"], "--top-p"),
    "top_p above one": (["--prompt", "the", "--top-p", "1.5"], "--top-p"),
    "mtp without MTP": (["--prompt", "the", "--speculative", "mtp", "--plain"], "--speculative"),
    "unreadable prompt file": (["--prompt-file", "/nonexistent/prompt.txt"], "/nonexistent/prompt.txt"),
    "compile with FP8 weights": (["--prompt", "the", "--compile", "--dtype", "fp8", "--max-new-tokens", "4"],
                                 "--compile"),
    "unreadable checkpoint": (["--prompt", "the", "--load", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_exits_nonzero_with_one_line_naming_it(name, dirs, capfd):
    argv, words = BAD[name]
    load = str(dirs[1] if "--plain" in argv else dirs[0])
    argv = [a for a in argv if a != "--plain"]
    code, _, err = run_tool(["--load", load, *argv] if "--load" not in argv else argv, capfd)
    assert code == 2
    assert err.startswith("generate: error: ") and words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_ids_outside_the_models_vocabulary_exit_nonzero(dirs, capfd):
    ids = train_bpe(TEXT, 300).encode("the cat sat on the mat")
    assert max(ids) >= DIMS["vocab_size"]  # the merges run past the model's 266 ids
    code, _, err = run_tool(["--load", str(dirs[0]), "--prompt", "the cat sat on the mat", "--max-new-tokens", "4"],
                            capfd)
    assert code == 2 and "vocab" in err and "Traceback" not in err
