"""The training loop: steps until --train-iters, a stop request or --exit-interval, with held-out evaluation
and timed saves between steps.

The recipe builds the pieces (trainer, schedules, loader, logger, evaluation) and a ``save`` callable; this loop
only orders them. Every decision that ends or saves the run is agreed across ranks first (``agree``), so all
ranks break out of the same step and save the same checkpoint together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from moelib.parallel import report
from moelib.precision.telemetry import collect_telemetry
from moelib.train.faults import SaveTimer, SkipGuard, StopRequest, agree


@dataclass
class LoopOptions:
    train_iters: int
    log_interval: int
    eval_interval: int = 0  # evaluate the valid split every N steps (0: only at the end)
    exit_interval: int = 0  # save and stop at the first step that is a multiple of N (0: off)
    save_interval: int = 0  # also save every N steps (0: off)
    save_interval_minutes: float = 0.0  # also save after this much wall time since the last save (0: off)
    max_skipped_steps: int = 0  # stop with an error after this many non-finite steps in a row (0: never)


@dataclass
class LoopOutcome:
    stopped: bool = False  # ended by a stop request or --exit-interval, not by reaching train_iters
    first_loss: float | None = None  # the first finite step's LM loss
    recent: list[float] = field(default_factory=list)  # the last ten finite steps' LM losses


def train_loop(trainer, schedules, loader, log, evals, save: Callable[[], object], opts: LoopOptions) -> LoopOutcome:
    """Train from ``trainer.step`` on; ``save()`` writes a checkpoint (the caller saves once more at the end).
    Reaching ``train_iters`` ends with the last valid evaluation (unless the interval just ran it) and the test."""
    out = LoopOutcome()
    stop, guard, timer = StopRequest(), SkipGuard(opts.max_skipped_steps), SaveTimer(opts.save_interval_minutes)
    try:
        while trainer.step < opts.train_iters:
            report.mark(f"train step {trainer.step + 1}")
            v = schedules.step()
            tokens, labels = loader.next_batch(v.batch_size)
            r = trainer.train_step(tokens, labels, lr=v.lr, mtp_weight=v.mtp_weight,
                                   bias_update_speed=v.bias_update_speed)
            extra = telemetry_summary(trainer) if r.step % opts.log_interval == 0 else None
            log.step(r, extra, quiet={"batch_size": v.batch_size, "consumed_tokens": v.tokens,
                                      "mtp_weight": v.mtp_weight, "bias_update_speed": v.bias_update_speed})
            guard.update(r.skipped, trainer.step)
            if not r.skipped:
                out.first_loss = r.lm_loss if out.first_loss is None else out.first_loss
                out.recent = (out.recent + [r.lm_loss])[-10:]
            if opts.eval_interval and not r.skipped and r.step % opts.eval_interval == 0:
                evals.run("valid", consumed_tokens=v.tokens)
            report.mark(f"stop/save agreement after step {trainer.step}")
            stop_now, save_due = agree(stop.requested, timer.due())
            if stop_now:
                log.write(f"{stop.signal_name or 'a stop request'} on some rank: saving at step {trainer.step}")
                out.stopped = True
                break
            if opts.exit_interval and not r.skipped and r.step % opts.exit_interval == 0:
                log.write(f"--exit-interval {opts.exit_interval}: saving and stopping at step {trainer.step}")
                out.stopped = True
                break
            if (save_due or opts.save_interval and r.step % opts.save_interval == 0) and r.step < opts.train_iters:
                save()
                timer.saved()
        if trainer.step == opts.train_iters:  # the end of training (not a stop): the last valid and the test
            consumed = schedules.state.consumed_tokens
            if not (opts.eval_interval and trainer.step % opts.eval_interval == 0):
                evals.run("valid", consumed_tokens=consumed)
            evals.run("test", consumed_tokens=consumed)
    finally:
        stop.restore()
    return out


def telemetry_summary(trainer) -> dict[str, float]:
    """FP8 health over this rank's Linears since the last call: share of values flushed to zero and of
    saturated values (empty for non-FP8 backends or when telemetry is off)."""
    counts = [c for model in trainer.models.values() for per_kind in collect_telemetry(model).values()
              for c in per_kind.values()]
    total = sum(c["numel"] for c in counts)
    if not total:
        return {}
    return {"fp8_underflow": sum(c["underflow"] for c in counts) / total,
            "fp8_saturated": sum(c["saturated"] for c in counts) / total}
