"""tools/plot_run.py: a run's JSON lines become one PNG; a missing or broken log is one error line."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def plot(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "plot_run.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def write_log(path, steps=6):
    lines = []
    for s in range(1, steps + 1):
        lines.append({"step": s, "loss": 9 - s / 3, "lm_loss": 9 - s / 3, "lr": 1e-3 * s, "max_vio": 0.5,
                      "tokens_per_s": 1000.0 + s, "consumed_tokens": 256 * s})
        if s % 2 == 0:
            lines.append({"step": s, "consumed_tokens": 256 * s, "valid_loss": 9 - s / 4, "valid_max_vio": 0.6})
    lines.append({"step": steps, "consumed_tokens": 256 * steps, "test_loss": 7.5, "test_max_vio": 0.7})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_plot_is_one_png_beside_the_log(tmp_path):
    log = write_log(tmp_path / "run.jsonl")
    r = plot(log)
    assert r.returncode == 0, r.stderr
    png = tmp_path / "run.png"
    assert r.stdout.strip() == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = plot(log, "-o", tmp_path / "out" / "x.png")
    assert r.returncode == 0 and (tmp_path / "out" / "x.png").stat().st_size > 10_000


def test_missing_or_broken_log_is_one_error_line(tmp_path):
    r = plot(tmp_path / "none.jsonl")
    assert r.returncode == 2 and r.stderr.startswith("plot_run: error:") and "none.jsonl" in r.stderr
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n')
    r = plot(tmp_path / "bad.jsonl")
    assert r.returncode == 2 and "line 2 is not a JSON object" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "held.jsonl").write_text('{"step": 1, "valid_loss": 3.0}\n')
    r = plot(tmp_path / "held.jsonl")
    assert r.returncode == 2 and "holds no training step" in r.stderr
