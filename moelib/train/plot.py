"""One PNG of a run from its --log-json lines: training and held-out loss, learning rate, MaxVio and
tokens/s, each against consumed tokens (comparable across batch sizes, ramps and resumed runs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from moelib.errors import ConfigError, DataError


def read_log(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) of a --log-json file, in the order written."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such log file (the recipe writes one with --log-json)")
    train, held = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {n} is not a JSON object.") from None
        (train if "loss" in row else held).append(row)
    if not train:
        raise DataError(f"{path} holds no training step (no line with a 'loss').")
    return train, held


def plot_run(log_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Write the run's PNG to ``png_path`` (four panels, x = consumed tokens); returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting a run needs the matplotlib package (pip install matplotlib)") from None
    train, held = read_log(log_path)
    x = lambda rows: [r.get("consumed_tokens") or r["step"] for r in rows]
    unit = "consumed tokens" if train[0].get("consumed_tokens") else "step"
    valid = [r for r in held if "valid_loss" in r]
    test = [r for r in held if "test_loss" in r]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    (loss, lr), (vio, speed) = axes
    for ax, key, label in ((loss, "loss", "LM loss"), (vio, "max_vio", "MaxVio")):
        ax.plot(x(train), [r["lm_loss" if key == "loss" else key] for r in train], lw=1, label="training")
        for rows, part, style in ((valid, "valid", "o-"), (test, "test", "s")):
            if rows:
                ax.plot(x(rows), [r[f"{part}_{key}"] for r in rows], style, label=part)
        ax.set_ylabel(label)
        ax.legend()
    lr.plot(x(train), [r["lr"] for r in train])
    lr.set_ylabel("learning rate")
    speed.plot(x(train), [r["tokens_per_s"] for r in train])
    speed.set_ylabel("tokens/s")
    for ax in (vio, speed):
        ax.set_xlabel(unit)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(Path(log_path).name)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
