"""The single-process training loop: forward, backward, clip, AdamW, then the router-bias update from
the expert counts of the batch just finished.

This Trainer is the reference. moelib.train.parallel_trainer.ParallelTrainer runs the same step over any
layout (pipeline stages, expert and data parallelism, ZeRO-1); on the same model, data and seed it must
reproduce this trainer's losses and parameters (tests/distributed/test_pipeline_parity.py checks every
layout against it). A change to the step goes here first, then there."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from moelib.config import ModelConfig, TrainConfig
from moelib.model.transformer import Transformer, build_model
from moelib.precision import weight_cache
from moelib.precision.weight_grad import fresh_grads
from moelib.train.ema import ParameterEMA
from moelib.train.metrics import LoadStats, collect_load
from moelib.train.optimizer import build_optimizer
from moelib.train.recompute import apply_recompute
from moelib.train.schedules import lr_at


@dataclass
class StepResult:
    step: int
    loss: float
    lm_loss: float
    mtp_loss: float
    aux_loss: float
    lr: float
    grad_norm: float
    max_vio: float
    tokens_per_s: float


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, device: str | torch.device = "cpu",
                 model: Transformer | None = None):
        self.cfg, self.device = cfg, torch.device(device)
        self.model = model if model is not None else build_model(model_cfg, cfg.precision, seed=cfg.seed)
        self.model.to(self.device)
        apply_recompute(self.model, cfg.recompute)
        self.optimizer = build_optimizer(self.model, cfg)
        self.ema = ParameterEMA.from_modules(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.step = 0
        self.last_load: LoadStats | None = None

    def train_step(self, tokens: torch.Tensor, labels: torch.Tensor) -> StepResult:
        start = time.perf_counter()
        model, cfg = self.model, self.cfg
        model.train()
        tokens, labels = tokens.to(self.device), labels.to(self.device)
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # FP8 backward reuses the forward's quantised weights; the gradients start from zero and keep their
        # buffers, without a zeroing pass (fresh_grads).
        with weight_cache.reuse(), fresh_grads(model.parameters()):
            with model.backend.autocast(self.device.type):
                out = model.compute_loss(tokens, labels, cfg.mtp_loss_weight)
            out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else
                                                   float("inf"))
        self.optimizer.step()
        load = collect_load(model)
        if cfg.bias_update_speed > 0:
            for name, moe in model.moe_layers().items():
                moe.gate.update_bias(load.counts[name], cfg.bias_update_speed)
        self.last_load = load
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)
        aux = sum(float(m.last_aux_loss) for m in model.moe_layers().values())
        mtp = float(torch.stack(out.mtp_losses).detach().mean()) if out.mtp_losses else 0.0
        return StepResult(self.step, out.loss.item(), out.lm_loss.item(), mtp, aux, lr, float(grad_norm),
                          load.mean_max_vio, tokens.numel() / (time.perf_counter() - start))

    def train(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], log=None) -> Iterator[StepResult]:
        """Run until cfg.train_iters steps are done, yielding each step's result."""
        it = iter(batches)
        while self.step < self.cfg.train_iters:
            tokens, labels = next(it)
            result = self.train_step(tokens, labels)
            if log is not None and (result.step % self.cfg.log_interval == 0 or result.step == 1):
                log(result)
            yield result
