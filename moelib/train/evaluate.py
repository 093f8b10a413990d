"""Held-out evaluation: LM loss and perplexity, each MTP depth's loss and top-1 accuracy, and MaxVio.

Forward passes only, in training mode under ``torch.no_grad()``: the MoE layers then count expert loads
(for the held-out MaxVio) but build no balance loss. The counts are taken out and the training counts
put back, so an evaluation changes nothing that training reads: no gradient, optimizer state, router
bias, load count or random number. Every quantity is summed over tokens first (cross-entropy, correct
top-1 predictions, tokens) and divided once at the end, so any split of the batches over micro-batches,
pipeline stages and data-parallel ranks gives the same result up to fp32 rounding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moelib.model.embedding import embedding_lookup
from moelib.model.loss import IGNORE_INDEX
from moelib.model.router import max_violation
from moelib.model.transformer import Transformer, shift_left
from moelib.parallel.pipeline.schedule import build_schedule, forward_only
from moelib.precision.linear import compute_dtype
from moelib.train.data import BatchLoader, PackedDataset

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class HeldOut:
    loss: float               # mean next-token cross-entropy of the main model
    acc: float                # its top-1 accuracy
    mtp_loss: list[float]     # per MTP depth k = 1..D: cross-entropy of the token k + 1 ahead
    mtp_acc: list[float]      # and its top-1 accuracy (depth 1: a speculative decoder's draft acceptance)
    max_vio: float            # MaxVio of the held-out expert loads, mean over MoE layers
    tokens: int               # tokens the main loss was taken over

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat scalars for logs: ``{prefix}_loss``, ``_ppl``, ``_acc``, ``_max_vio``, ``_mtp_loss`` (mean over
        depths), ``_mtp_acc`` (depth 1) and ``_mtp{k}_loss`` / ``_mtp{k}_acc`` per depth."""
        out = {f"{prefix}_loss": self.loss, f"{prefix}_ppl": self.ppl, f"{prefix}_acc": self.acc,
               f"{prefix}_max_vio": self.max_vio}
        if self.mtp_loss:
            out[f"{prefix}_mtp_loss"] = sum(self.mtp_loss) / len(self.mtp_loss)
            out[f"{prefix}_mtp_acc"] = self.mtp_acc[0]
            for k, (loss, acc) in enumerate(zip(self.mtp_loss, self.mtp_acc), start=1):
                out[f"{prefix}_mtp{k}_loss"], out[f"{prefix}_mtp{k}_acc"] = loss, acc
        return out


def head_sums(model: Transformer, h: torch.Tensor, labels: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              embedding: torch.nn.Embedding | None = None) -> torch.Tensor:
    """float64 [3 (1 + D)]: (summed cross-entropy, correct top-1 predictions, tokens) of the main head, then
    of each MTP depth, from the last decoder layer's output ``h``; the MTP chain as in Transformer.head_loss."""
    emb = embedding if embedding is not None else model.embed_tokens
    h = model.norm(h)
    sums = [_cross_entropy_sums(h, model.lm_head.weight, labels)]
    for k, module in enumerate(model.mtp, start=1):
        h = module(h, embedding_lookup(shift_left(labels, k - 1, 0).clamp(min=0), emb.weight), cos, sin)
        sums.append(_cross_entropy_sums(h, model.lm_head.weight, shift_left(labels, k, IGNORE_INDEX)))
    return torch.cat(sums)


def _cross_entropy_sums(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # The logits in the compute dtype and the softmax in fp32, as the training loss takes them.
    dtype = compute_dtype(h)
    logits = F.linear(h.to(dtype), weight.to(dtype)).float().flatten(0, -2)
    labels = labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.argmax(-1) == labels) & valid).sum()
    return torch.stack([ce.double(), correct.double(), valid.sum().double()])


def _stage_head(stage, h, labels, cos, sin) -> torch.Tensor:
    return head_sums(stage.model, h, labels, cos, sin, embedding=stage.embedding)


class _HeldOutCounts:
    """Swap every MoE layer's training load counts for zeros while evaluating; put them back after."""

    def __init__(self, models: Iterable[Transformer]):
        self.moes = [moe for model in models for moe in model.moe_layers().values()]

    def __enter__(self):
        self.saved = [moe.load_counts.clone() for moe in self.moes]
        for moe in self.moes:
            moe.load_counts.zero_()
        return self

    def __exit__(self, *exc):
        for moe, counts in zip(self.moes, self.saved):
            moe.load_counts.copy_(counts)


def _result(sums: torch.Tensor, vio_sum: float, layers: float) -> HeldOut:
    per = sums.view(-1, 3)
    mean = lambda row, i: float(row[i] / row[2]) if row[2] > 0 else math.nan
    return HeldOut(loss=mean(per[0], 0), acc=mean(per[0], 1), mtp_loss=[mean(r, 0) for r in per[1:]],
                   mtp_acc=[mean(r, 1) for r in per[1:]], max_vio=vio_sum / layers if layers else 0.0,
                   tokens=int(per[0, 2]))


def _micro_batches(tokens: torch.Tensor, labels: torch.Tensor, size: int, device) -> list[Batch]:
    return [(tokens[i:i + size].to(device), labels[i:i + size].to(device)) for i in range(0, tokens.shape[0], size)]


def evaluate_model(model: Transformer, batches: Iterable[Batch], micro_batch_size: int) -> HeldOut:
    """Held-out metrics of one whole model (one process) over ``batches`` of [B, T] tokens and labels."""
    device = model.embed_tokens.weight.device
    sums = torch.zeros(3 * (1 + len(model.mtp)), dtype=torch.float64)
    with _HeldOutCounts([model]) as held, torch.no_grad(), model.backend.autocast(device.type):
        for tokens, labels in batches:
            for t, y in _micro_batches(tokens, labels, micro_batch_size, device):
                cos, sin = model.rope(t.shape[1], t.device)
                sums += head_sums(model, model.decoder(model.embed(t), cos, sin), y, cos, sin).cpu()
        vio = sum(max_violation(moe.load_counts) for moe in held.moes)
        return _result(sums, vio, len(held.moes))


def evaluate(trainer, batches: Iterable[Batch]) -> HeldOut:
    """Held-out metrics under a ParallelTrainer's layout: each rank passes its data-parallel share of every
    global batch; the micro-batches go forward through the pipeline (``schedule.forward_only``), with the
    expert all-to-alls. Collective: every rank calls it with the same number of batches. Same result on
    every rank."""
    mbs, par, device = trainer.cfg.micro_batch_size, trainer.par, trainer.env.device
    sums = torch.zeros(3 * (1 + trainer.model_cfg.num_nextn_predict_layers), dtype=torch.float64)
    with _HeldOutCounts(trainer.models.values()):
        for tokens, labels in batches:
            micro = _micro_batches(tokens, labels, mbs, device)
            program = forward_only(build_schedule(par.pipeline_schedule, par.pp, len(micro)))
            for s in trainer.runtime.forward_only(micro, program, _stage_head):
                sums += s.cpu()
        dist.all_reduce(sums)  # each sequence's sums live on the one rank that ran its last stage
        # The global counts per MoE layer (mirror copies and DP ranks summed), averaged over layers as the
        # training MaxVio is: each rank adds its layers' values and the pipeline group sums them.
        counts = trainer.sync.sync_load_counts()
        vio = torch.tensor([sum(max_violation(c) for c in counts.values()), float(len(counts))],
                           dtype=torch.float64)
        dist.all_reduce(vio, group=trainer.mesh.pp_group)
    return _result(sums, float(vio[0]), float(vio[1]))


def heldout_batches(dataset: PackedDataset, global_batch_size: int, iters: int, *, seed: int, dp_rank: int = 0,
                    dp_size: int = 1) -> list[Batch]:
    """The first ``iters`` shuffled global batches of a held-out part, this DP rank's share of each: the same
    batches at every evaluation of a run, so successive held-out losses compare like with like."""
    loader = BatchLoader(dataset, global_batch_size, seed=seed, dp_rank=dp_rank, dp_size=dp_size)
    return [loader.next_batch() for _ in range(iters)]


class Evaluation:
    """The recipe's held-out evaluations: ``run("valid")`` every few steps and ``run("test")`` at the end, on
    fixed batches of each part, reported on the console, in the JSON lines and in TensorBoard (``log`` is a
    TrainingLogger). ``last`` holds the latest metrics of each part."""

    def __init__(self, trainer, parts: dict[str, PackedDataset | None], global_batch_size: int, iters: int, *,
                 seed: int, log):
        self.trainer, self.log, self.last = trainer, log, {}
        mesh = trainer.mesh
        self.batches = {
            part: heldout_batches(ds, global_batch_size, max(1, min(iters, len(ds) // global_batch_size)), seed=seed,
                                  dp_rank=mesh.dp_rank, dp_size=mesh.dp)
            for part, ds in parts.items() if part != "train" and ds is not None and iters > 0}

    def run(self, part: str, consumed_tokens: int | None = None) -> HeldOut | None:
        """Evaluate ``part`` ("valid" or "test") and report it; None when the run has no such part."""
        if part not in self.batches:
            return None
        result = evaluate(self.trainer, self.batches[part])
        metrics = result.metrics(part)
        self.last.update(metrics)
        step, log = self.trainer.step, self.log
        line = (f"{part:>5} {step:6d} | loss {result.loss:.4f} | ppl {result.ppl:.2f} | acc {result.acc:.3f} | "
                f"MaxVio {result.max_vio:.3f}")
        for k, (loss, acc) in enumerate(zip(result.mtp_loss, result.mtp_acc), start=1):
            line += f" | mtp{k} loss {loss:.4f} acc {acc:.3f}"
        log.write(line + f" | {result.tokens:,} tokens")
        if log.json:
            log.json.write(json.dumps({"step": step, "consumed_tokens": consumed_tokens, **metrics}) + "\n")
            log.json.flush()
        if log.tb is not None:
            for key, value in metrics.items():
                log.tb.add_scalar(f"{part}/{key.removeprefix(part + '_')}", value, step)
        return result
