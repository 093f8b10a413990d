"""moelib.train.loop on stand-ins for the trainer, schedules, loader, logger and evaluation: what ends the
loop, when it evaluates and saves (the recipe's end-to-end behaviour is tested in tests/distributed)."""

import os
import signal
from types import SimpleNamespace

import pytest

from moelib.train.faults import TooManySkippedSteps
from moelib.train.loop import LoopOptions, train_loop


class FakeTrainer:
    def __init__(self, skip_steps=(), signal_at=None):
        self.step, self.models = 0, {}
        self.skip_steps, self.signal_at, self.calls = set(skip_steps), signal_at, 0

    def train_step(self, tokens, labels, **_):
        self.calls += 1
        skipped = self.calls in self.skip_steps  # a skipped step does not move the counter
        if not skipped:
            self.step += 1
        if self.signal_at == self.calls:
            os.kill(os.getpid(), signal.SIGUSR1)  # as mpirun forwards a stop request
        return SimpleNamespace(step=self.step, lm_loss=10.0 - self.step, skipped=skipped)


class Recorder:
    def __init__(self):
        self.events = []
        self.state = SimpleNamespace(consumed_tokens=0)

    def step(self, *args, **_):  # Schedules.step and TrainingLogger.step share the name
        if args:
            return None
        self.state.consumed_tokens += 8
        return SimpleNamespace(batch_size=2, tokens=self.state.consumed_tokens, lr=1e-3, mtp_weight=0.3,
                               bias_update_speed=1e-3)

    def next_batch(self, n):
        return None, None

    def write(self, line):
        self.events.append(("log", line))

    def run(self, split, consumed_tokens):
        self.events.append((split, consumed_tokens))

    def save(self):
        self.events.append(("save", None))


def run(trainer, **opts):
    rec = Recorder()
    out = train_loop(trainer, rec, rec, rec, rec, rec.save, LoopOptions(log_interval=1, **opts))
    return out, [e for e in rec.events if e[0] != "log"]


def test_runs_to_the_end_with_interval_and_final_evaluations():
    out, events = run(FakeTrainer(), train_iters=5, eval_interval=2, save_interval=2)
    assert not out.stopped and out.first_loss == 9.0 and out.recent == [9.0, 8.0, 7.0, 6.0, 5.0]
    # valid every 2 steps, a save every 2 steps before the last, then the last valid and the test
    assert events == [("valid", 16), ("save", None), ("valid", 32), ("save", None), ("valid", 40), ("test", 40)]


def test_final_valid_is_not_repeated_when_the_interval_just_ran_it():
    _, events = run(FakeTrainer(), train_iters=4, eval_interval=2)
    assert events == [("valid", 16), ("valid", 32), ("test", 32)]


def test_exit_interval_stops_without_the_end_of_run_evaluation():
    trainer = FakeTrainer()
    out, events = run(trainer, train_iters=10, exit_interval=3)
    assert out.stopped and trainer.step == 3 and events == []


def test_a_signal_stops_after_the_current_step_and_restores_the_handler():
    before = signal.getsignal(signal.SIGUSR1)
    trainer = FakeTrainer(signal_at=2)
    out, events = run(trainer, train_iters=10)
    assert out.stopped and trainer.step == 2 and events == []
    assert signal.getsignal(signal.SIGUSR1) == before


def test_skipped_steps_are_retried_and_too_many_in_a_row_raise():
    trainer = FakeTrainer(skip_steps={2})
    out, _ = run(trainer, train_iters=3, max_skipped_steps=2)
    assert trainer.step == 3 and trainer.calls == 4 and out.recent == [9.0, 8.0, 7.0]
    with pytest.raises(TooManySkippedSteps, match="2 steps in a row"):
        run(FakeTrainer(skip_steps={2, 3}), train_iters=5, max_skipped_steps=2)
