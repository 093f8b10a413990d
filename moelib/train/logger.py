"""What rank 0 shows and writes every N steps: a progress bar with ETA (on a terminal, also one behind
mpirun when moelib.parallel.mpirun says so; else the text line carries step/total and the ETA), one text
line, JSON lines and TensorBoard scalars, with the same metrics in each."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from typing import Any

from moelib.errors import ConfigError
from moelib.parallel.mpirun import TERMINAL_ENV


class TrainingLogger:
    def __init__(self, total_steps: int, start_step: int, interval: int, *, enabled: bool, json_path: str | None,
                 tensorboard_dir: str | None, flops_per_token: float, peak_flops: float):
        self.interval, self.enabled = interval, enabled
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.json = open(json_path, "a") if enabled and json_path else None
        self.tb = None
        if enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard-dir needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(tensorboard_dir)
        self.bar, self.total, self.start_step, self.began = None, total_steps, start_step, time.monotonic()
        if enabled and (sys.stderr.isatty() or os.environ.get(TERMINAL_ENV) == "1"):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def metrics(self, r, extra: dict[str, float] | None = None) -> dict[str, Any]:
        tflops = r.tokens_per_s * self.flops_per_token / 1e12
        out = {"step": r.step, "loss": r.loss, "lm_loss": r.lm_loss, "mtp_loss": r.mtp_loss,
               "balance_loss": r.balance_loss, "lr": r.lr, "grad_norm": r.grad_norm, "max_vio": r.max_vio,
               "tokens_per_s": r.tokens_per_s, "tflops": tflops, "mfu": tflops * 1e12 / self.peak_flops,
               "skipped": r.skipped}
        out.update(extra or {})
        return out

    def step(self, r, extra: dict[str, float] | None = None, quiet: dict[str, float] | None = None) -> None:
        """Log step result ``r``; ``extra`` goes everywhere, ``quiet`` (e.g. schedule values) to JSON and
        TensorBoard only."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{r.lm_loss:.3f}")
        if not (r.skipped or r.step % self.interval == 0 or r.step == 1):
            return
        m = self.metrics(r, extra)
        line = (f"step {m['step']:6d} | loss {m['lm_loss']:.4f} | mtp {m['mtp_loss']:.4f} | "
                f"balance {m['balance_loss']:.2e} | lr {m['lr']:.2e} | grad norm {m['grad_norm']:.2f} | "
                f"MaxVio {m['max_vio']:.3f} | {m['tokens_per_s']:,.0f} tok/s | {m['tflops']:.3f} TFLOP/s | "
                f"MFU {m['mfu']:.1%}")
        if r.skipped:
            line = f"step {r.step + 1:6d} | SKIPPED: non-finite loss {r.loss} or gradient norm {r.grad_norm}"
        for key in sorted(extra or {}):
            line += f" | {key} {extra[key]:.3g}"
        if self.bar is None:  # no bar (a file, a pipe): the line says how far along the run is
            line += f" | {r.step}/{self.total} ETA {self.eta(r.step)}"
        self.write(line)
        m.update(quiet or {})
        if self.json:
            self.json.write(json.dumps(m) + "\n")
            self.json.flush()
        if self.tb is not None:
            for key, value in m.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"train/{key}", value, r.step)

    def eta(self, step: int) -> str:
        """Time left at this run's pace so far, as h:mm:ss."""
        done = step - self.start_step
        left = (self.total - step) * (time.monotonic() - self.began) / done if done > 0 else 0.0
        return str(datetime.timedelta(seconds=round(left)))

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        for thing in (self.bar, self.json, self.tb):
            if thing is not None:
                thing.close()
