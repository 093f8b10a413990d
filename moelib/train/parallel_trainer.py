"""The distributed training step: pipeline stages with expert parallelism, gradient reduction over DP
and EDP, ZeRO-1 AdamW, and the router-bias update from the global batch's expert counts.

Every rank builds only its own stages (parameters initialised as in the full model, keyed by name), so
single-process training of the same model and data (moelib.train.trainer.Trainer) is the reference every
layout must reproduce.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moelib.config import ModelConfig, ParallelConfig, TrainConfig
from moelib.errors import CheckpointError, ConfigError
from moelib.model.router import max_violation
from moelib.parallel.expert_parallel import shard_experts
from moelib.parallel.grad_sync import GradSync
from moelib.parallel.launch import init
from moelib.parallel.mesh import Mesh
from moelib.parallel.pipeline.runtime import PipelineRuntime
from moelib.parallel.pipeline.schedule import build_schedule
from moelib.parallel.pipeline.stage import PipelineStage, build_stage, split_layers
from moelib.parallel.zero import ZeroAdamW
from moelib.precision.adamw import moment_dtype_of
from moelib.precision.weight_grad import fresh_grads
from moelib.train.ema import ParameterEMA
from moelib.train.recompute import apply_recompute
from moelib.train.schedules import lr_at


@dataclass
class ParallelStepResult:
    step: int
    loss: float
    lm_loss: float
    mtp_loss: float
    lr: float
    grad_norm: float
    max_vio: float
    tokens_per_s: float
    events: list[dict] | None = None
    balance_loss: float = 0.0     # alpha * L_bal summed over MoE layers, mean over micro-batches
    skipped: bool = False         # non-finite loss or gradient: no update was made
    seconds: float = 0.0


class ParallelTrainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, par: ParallelConfig, *,
                 fp8_dispatch: bool = False, record_timeline: bool = False):
        self.env = init()
        self.model_cfg, self.cfg, self.par = model_cfg, cfg, par
        self.mesh = mesh = Mesh(par, model_cfg)
        self.schedule = schedule = build_schedule(par.pipeline_schedule, par.pp, par.microbatches)
        specs = split_layers(model_cfg, schedule.num_stages, cfg.seq_length)
        chunks = range(len(schedule.placement[mesh.pp_rank]))
        stage_ids = {c: schedule.stage_of(mesh.pp_rank, c) for c in chunks}
        # MTP on the last stage reads the embedding: DualPipe(V) puts stage 0 on the same rank; otherwise
        # the last stage keeps a copy whose gradient GradSync adds to the first stage's (same name).
        has_first = 0 in stage_ids.values()
        self.models = {}
        for c, s in stage_ids.items():
            keep = specs[s].is_last and not has_first and model_cfg.num_nextn_predict_layers > 0
            model = build_stage(model_cfg, cfg.precision, specs[s], cfg.seed, keep, device=self.env.device)
            if par.ep > 1 or par.max_nodes_per_token is not None:
                shard_experts(model, mesh.ep_group, fp8=fp8_dispatch, ranks_per_node=par.ranks_per_node,
                              max_nodes=par.max_nodes_per_token, grad_group=mesh.ep_grad_group)
            apply_recompute(model, cfg.recompute)
            model.set_aux_loss_scale(1.0 / par.microbatches)
            self.models[c] = model
        embedding = next((m.embed_tokens for c, m in self.models.items() if stage_ids[c] == 0), None)
        stages = {c: PipelineStage(m, specs[stage_ids[c]], embedding=embedding) for c, m in self.models.items()}
        self.sync = GradSync(mesh, list(self.models.values()))
        self.optimizer = ZeroAdamW(self.sync, cfg.lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps,
                                   cfg.weight_decay, moment_dtype=moment_dtype_of(cfg.moment_dtype))
        self.ema = self._new_ema()
        backend = next(iter(self.models.values())).backend
        pp_ranks = [mesh.global_rank(p) for p in range(par.pp)]
        shape = (cfg.micro_batch_size, cfg.seq_length, model_cfg.hidden_size)
        self.runtime = PipelineRuntime(schedule, mesh.pp_rank, stages, pp_ranks, shape, torch.float32,
                                       self.env.device, autocast=lambda: backend.autocast(self.env.device.type),
                                       mtp_weight=cfg.mtp_loss_weight, record=record_timeline)
        self.step = 0
        self._schedules = {par.microbatches: schedule}

    def _new_ema(self) -> ParameterEMA | None:
        if self.cfg.ema_decay <= 0:
            return None
        return ParameterEMA(self.sync.params, self.cfg.ema_decay, expert_modules=self.sync.expert_modules)

    def set_microbatches(self, m: int) -> None:
        """Run the next steps with ``m`` micro-batches per DP rank (a batch-size ramp changes it)."""
        if m == self.runtime.schedule.num_microbatches:
            return
        if m not in self._schedules:
            self._schedules[m] = build_schedule(self.par.pipeline_schedule, self.par.pp, m)
        self.runtime.set_schedule(self._schedules[m])
        for model in self.models.values():
            model.set_aux_loss_scale(1.0 / m)

    @property
    def local_batch_size(self) -> int:
        """Sequences this DP rank takes per step: micro-batch size x micro-batches."""
        return self.cfg.micro_batch_size * self.par.microbatches

    @property
    def global_batch_size(self) -> int:
        return self.local_batch_size * self.mesh.dp

    def train_step(self, tokens: torch.Tensor, labels: torch.Tensor, *, lr: float | None = None,
                   mtp_weight: float | None = None, bias_update_speed: float | None = None) -> ParallelStepResult:
        """One optimizer step on this DP rank's share of the global batch, [k x micro_batch_size, T]: k
        micro-batches (``local_batch_size`` rows by default; a batch-size ramp sends other multiples).

        ``lr``, ``mtp_weight`` and ``bias_update_speed`` come from the token-driven schedules
        (moelib.train.schedules.Schedules); left out, they are ``lr_at(step)`` and the TrainConfig values.
        A non-finite loss or gradient norm (the same on every rank: both are global) skips the update:
        gradients and expert counts are dropped and ``skipped`` is set; the step counter does not move.
        """
        start = time.perf_counter()
        cfg, mbs = self.cfg, self.cfg.micro_batch_size
        if tokens.shape[0] % mbs or tokens.shape[0] == 0:
            raise ConfigError(f"batch of {tokens.shape[0]} sequences on this data-parallel rank is not a positive "
                              f"multiple of micro_batch_size {mbs}")
        self.set_microbatches(tokens.shape[0] // mbs)
        device = self.env.device
        batches = [(tokens[i:i + mbs].to(device), labels[i:i + mbs].to(device))
                   for i in range(0, tokens.shape[0], mbs)]
        lr = lr_at(self.step, cfg) if lr is None else lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.runtime.mtp_weight = cfg.mtp_loss_weight if mtp_weight is None else mtp_weight
        gamma = cfg.bias_update_speed if bias_update_speed is None else bias_update_speed
        params = [p for model in self.models.values() for p in model.parameters()]
        with fresh_grads(params):  # every micro-batch's gradients summed from zero, without a zeroing pass
            stats = self.runtime.step(batches)
        # The losses live on the ranks that ran last stages; sum over the pipeline, average over DP.
        aux = sum(m.pop_aux_loss() for model in self.models.values() for m in model.moe_layers().values())
        losses = torch.tensor([stats.loss, stats.lm_loss, stats.mtp_loss, float(aux)], dtype=torch.float64)
        dist.all_reduce(losses)
        losses /= self.mesh.dp
        self.sync.reduce_gradients()
        grad_norm = self.sync.clip_grad_norm_(cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        skipped = not (math.isfinite(grad_norm) and bool(torch.isfinite(losses).all()))
        if skipped:
            self.optimizer.zero_grad(set_to_none=False)
            for model in self.models.values():
                for moe in model.moe_layers().values():
                    moe.load_counts.zero_()
            max_vio = float("nan")
        else:
            self.optimizer.step()
            counts = self.sync.update_router_biases(gamma)
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.step)  # returns at once; the average is folded in the background
            vio = sum(max_violation(c) for c in counts.values())
            n_layers = torch.tensor([float(len(counts)), vio], dtype=torch.float64)
            dist.all_reduce(n_layers, group=self.mesh.pp_group)  # each MoE layer lives on one pipeline rank
            max_vio = float(n_layers[1] / n_layers[0]) if n_layers[0] > 0 else 0.0
        elapsed = time.perf_counter() - start
        return ParallelStepResult(self.step, float(losses[0]), float(losses[1]), float(losses[2]), lr, grad_norm,
                                  max_vio, tokens.numel() * self.mesh.dp / elapsed,
                                  stats.events if self.runtime.record else None, balance_loss=float(losses[3]),
                                  skipped=skipped, seconds=elapsed)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's parameters and buffers under their global names (copies on other ranks overlap)."""
        out = {}
        for model in self.models.values():
            out.update(model.state_dict())
        return out

    # -- checkpoints: everything a resume needs, layout-free (keyed by global names) ----------------------

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able metadata) for save_checkpoint. Collective. Optimizer moments are stored per
        model tensor name (``optimizer.exp_avg.<name>``), so a checkpoint loads under another layout."""
        tensors = self.state_dict()
        opt = self.optimizer.state_dict()
        for name, moments in opt["state"].items():
            for kind, t in moments.items():
                tensors[f"optimizer.{kind}.{name}"] = t
        tensors[f"rng.torch.rank{self.env.rank}"] = torch.random.get_rng_state()
        meta = {"step": self.step, "optimizer": {"step": opt["step"], "param_groups": opt["param_groups"]},
                "layout": self.mesh.describe()}
        if self.ema is not None:
            tensors.update(self.ema.state_dict())
            meta["ema"] = {"decay": self.ema.decay, "step": self.ema.step}
        return tensors, meta

    def load_checkpoint(self, reader) -> None:
        """Restore model, router biases, optimizer and step from a CheckpointReader (any layout). A
        checkpoint without training state (e.g. imported from Hugging Face) gives the weights only."""
        with torch.no_grad():
            for model in self.models.values():
                own = model.state_dict()
                missing = [k for k in own if k not in reader.weight_map]
                if missing:
                    raise CheckpointError(f"{reader.path}: tensor {missing[0]} of this model is missing")
                loaded = {k: reader.get(k) for k in own}
                for k, t in loaded.items():
                    if t.shape != own[k].shape:
                        raise CheckpointError(f"{reader.path}: tensor {k} has shape {tuple(t.shape)}, this model "
                                              f"expects {tuple(own[k].shape)}")
                model.load_state_dict(loaded)
        if self.ema is not None:
            keys = self.ema.keys()
            if any(k in reader.weight_map for k in keys):
                self.ema.load_state_dict({k: reader.get(k) for k in keys})
            else:  # a checkpoint written without EMA: start averaging from the loaded weights
                self.ema = self._new_ema()
        if "train" not in reader.manifest:
            return
        meta = reader.manifest["train"]
        names = self.optimizer_names()
        state = {name: {kind: reader.get(f"optimizer.{kind}.{name}") for kind in ("exp_avg", "exp_avg_sq")}
                 for name in names}
        self.optimizer.load_state_dict({**meta["optimizer"], "state": state})
        rng = f"rng.torch.rank{self.env.rank}"
        if rng in reader.weight_map:  # the same rank count: continue its random stream too
            torch.random.set_rng_state(reader.get(rng))
        self.step = int(meta["step"])

    def optimizer_names(self) -> list[str]:
        """The model tensor names whose optimizer moments this rank's ZeRO shards cover."""
        names = []
        for model in self.models.values():
            for key in model.state_dict():
                if not key.endswith("e_score_correction_bias"):
                    names.append(key)
        return sorted(set(names))
