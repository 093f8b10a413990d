"""bench.py kernels: the GPU script's code path, run at tiny shapes in Triton's CPU interpreter (--smoke), so a
broken script is found before GPU time is spent on it; without a GPU and without --smoke it refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def bench(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"} if not torch.cuda.is_available() else dict(os.environ)
    return subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "kernels", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_kernels_smoke_checks_every_kernel(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "kernels.json"
    proc = bench("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["smoke"] and len(r["quant"]) == 2 and {q["block"] for q in r["quant"]} == {"1x128", "128x128"}
    assert all(q["bit_exact"] and q["quant_gbps"] > 0 and q["copy_gbps"] > 0 for q in r["quant"])
    for g in r["gemm"] + r["grouped_gemm"]:
        assert g["correct"] and g["tflops"] > 0 and isinstance(g["bf16_tflops"], float), g
        assert all(t["diff_vs_reference"] < 1e-5 for t in g["tiles"].values())
    assert r["gemm"][0]["diff_vs_bf16"] < 1e-2  # FP8 rounding of random normals against bf16
    assert "targets" in r


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
@pytest.mark.slow
def test_kernels_refuses_without_gpu(tmp_path):
    proc = bench("--out", str(tmp_path / "k.json"))
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "--smoke" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "k.json").exists()
