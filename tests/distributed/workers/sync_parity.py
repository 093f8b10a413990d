"""mpirun worker: gradient sync + global clipping + ZeRO-1 + router-bias sync equal single-process training.

    sync_parity.py [train PP:EP:SCHEDULE[,...]] [zero PP:EP[:MOMENTS][,...]]

``train``: several steps of the tiny model vs moelib's single-process Trainer (gradients of the first
step, losses, global gradient norms, parameters, router biases, optimizer memory). ``zero``: ZeRO-1 vs
torch.optim.AdamW on identical gradients, resuming the last step from a state_dict written at another
layout; with MOMENTS "bf16", both keep bf16 moments (the reference is moelib's single-process AdamW).

Rank 0 computes the reference from the same seed and broadcasts it. Pipelines are simulated without a
schedule, so only the reduction is under test: with "1f1b" every rank runs the whole model on its data
but owns (syncs, clips, steps) only its stage's parameters, then owners broadcast their stage; with
"dualpipe" (PP 2) each pipeline rank holds every parameter and runs half of its DP rank's micro-batches,
so each parameter has a mirror copy on the other pipeline rank, as in DualPipe.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from _sync_common import main, rel, result, shard_for_test, stage_view, tiny_cfg, world_max

from moelib.config import ParallelConfig, TrainConfig
from moelib.model.moe import MoE
from moelib.model.transformer import build_model
from moelib.parallel.grad_sync import GradSync
from moelib.parallel.mesh import Mesh
from moelib.parallel.zero import ZeroAdamW
from moelib.train.optimizer import AdamW, param_groups
from moelib.train.schedules import lr_at
from moelib.train.trainer import Trainer

SEED, SEQS, SEQ_LEN, STEPS = 3, 2, 8, 3  # SEQS sequences per DP rank per step
TRAIN = dict(seq_length=SEQ_LEN, train_iters=STEPS, lr=1e-2, min_lr=1e-3, lr_warmup_iters=1, weight_decay=0.1,
             clip_grad=0.05, bias_update_speed=1e-2, mtp_loss_weight=0.3, seed=SEED, precision="fp32")


def batch(step: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: dp·SEQS sequences (the same data whatever the layout)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, tiny_cfg().vocab_size, (8 * SEQS, SEQ_LEN + 1), generator=g)[: dp * SEQS]
    return x[:, :-1], x[:, 1:]


def train_cfg(dp: int) -> TrainConfig:
    return TrainConfig(micro_batch_size=dp * SEQS, **TRAIN)


def expert_slice(sync: GradSync, name: str, full: torch.Tensor) -> torch.Tensor:
    """The rows of a full-model tensor that this rank's (sharded) parameter ``name`` holds."""
    if name not in sync.expert_modules:
        return full
    module = sync.expert_modules[name][0]
    return full[module.expert_offset: module.expert_offset + module.num_experts]


def norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def reference(dp: int) -> dict:
    """Single-process training on the global batch, on rank 0, broadcast to all."""
    box = [None]
    if dist.get_rank() == 0:
        trainer = Trainer(tiny_cfg(), train_cfg(dp))
        probe = copy.deepcopy(trainer.model)  # the first step's gradients, before clipping
        probe.compute_loss(*batch(0, dp), train_cfg(dp).mtp_loss_weight).loss.backward()
        grads0 = {n: p.grad for n, p in probe.named_parameters()}
        steps = [trainer.train_step(*batch(s, dp)) for s in range(STEPS)]
        box[0] = {"loss": [r.loss for r in steps], "norm": [r.grad_norm for r in steps],
                  "state": trainer.model.state_dict(), "grads0": grads0}
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_train(pp: int, ep: int, schedule: str, refs: dict) -> None:
    cfg = tiny_cfg()
    mesh = Mesh(ParallelConfig(pp, ep, schedule), cfg)
    dp, tcfg = mesh.dp, train_cfg(mesh.dp)
    if dp not in refs:
        refs[dp] = reference(dp)
    ref = refs[dp]
    model = build_model(cfg, "fp32", seed=SEED)
    full_numel = {n: p.numel() for n, p in model.named_parameters()}
    shard_for_test(model, mesh.ep_group, mesh.ep_rank, ep)
    mirrored = schedule == "dualpipe"
    stages = [model] if pp == 1 or mirrored else [stage_view(model, s, pp) for s in range(pp)]
    mine = stages[0] if len(stages) == 1 else stages[mesh.pp_rank]
    sync = GradSync(mesh, mine)
    opt = ZeroAdamW(sync, tcfg.lr, (tcfg.adam_beta1, tcfg.adam_beta2), tcfg.adam_eps, tcfg.weight_decay)
    # DualPipe: each pipeline rank runs half of its DP rank's micro-batches; loss scaled by 1/2.
    share, scale = (slice(mesh.pp_rank * SEQS // pp, (mesh.pp_rank + 1) * SEQS // pp), 1.0 / pp) if mirrored \
        else (slice(0, SEQS), 1.0)
    loss_counted = mirrored or mesh.pp_rank == 0
    losses, norms = [], []
    for step in range(STEPS):
        tokens, labels = batch(step, dp)
        rows = slice(mesh.dp_rank * SEQS, (mesh.dp_rank + 1) * SEQS)
        tokens, labels = tokens[rows][share], labels[rows][share]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg)
        model.train()
        model.set_aux_loss_scale(scale)
        loss = model.compute_loss(tokens, labels, tcfg.mtp_loss_weight).loss * scale
        loss.backward()
        sync.reduce_gradients()
        if step == 0:
            grad_err = max(rel(sync.params[n][0].grad, expert_slice(sync, n, ref["grads0"][n])) for n in sync.names)
        norms.append(sync.clip_grad_norm_(tcfg.clip_grad))
        opt.step()
        opt.zero_grad()
        sync.update_router_biases(tcfg.bias_update_speed)
        for moe in model.modules():  # layers outside this rank's stage (1F1B simulation)
            if isinstance(moe, MoE):
                moe.load_counts.zero_()
        if len(stages) > 1:  # owners hand their updated stage to the other pipeline ranks
            for s, stage in enumerate(stages):
                for t in [*stage.parameters(), *(b for n, b in stage.named_buffers() if "bias" in n)]:
                    dist.broadcast(t.data, src=mesh.global_rank(s), group=mesh.pp_group)
        total = torch.tensor([loss.item() / dp if loss_counted else 0.0], dtype=torch.float64)
        dist.all_reduce(total)
        losses.append(float(total))
    state = model.state_dict()
    weights = [k for k in state if "e_score_correction_bias" not in k]
    param_err = max(rel(state[k], ref["state"][k]) for k in weights)
    param_norm_err = max(norm_rel(state[k], ref["state"][k]) for k in weights)
    biases = torch.cat([v.reshape(-1) for k, v in sorted(state.items()) if "e_score_correction_bias" in k])
    bias_err = max(rel(v, ref["state"][k]) for k, v in state.items() if "e_score_correction_bias" in k)
    everyone = [torch.empty_like(biases) for _ in range(mesh.world_size)]
    dist.all_gather(everyone, biases)
    bias_spread = max(float((b - everyone[0]).abs().max()) for b in everyone)
    owned = sum(full_numel[n] for n in sync.names)  # the unsharded size of what this rank steps
    mem = opt.state_bytes() * dp / (2 * 4 * owned)
    result(check="train", layout=f"{pp}:{ep}:{schedule}", dp=dp,
           loss_err=max(abs(a - b) / abs(b) for a, b in zip(losses, ref["loss"])),
           norm_err=max(abs(a - b) / abs(b) for a, b in zip(norms, ref["norm"])),
           clipped=sum(n > tcfg.clip_grad for n in ref["norm"]), grad_err=world_max(grad_err),
           param_err=world_max(param_err), param_norm_err=world_max(param_norm_err),
           bias_err=world_max(bias_err), bias_spread=bias_spread, bias_moved=float(biases.abs().max()),
           mem_x_dp=world_max(mem))


# -- ZeRO-1 alone, on identical gradients ----------------------------------------------------------------

LRS, WD, BETAS, EPS = (1e-2, 7e-3, 3e-3), 0.1, (0.9, 0.95), 1e-8


def fake_grads(model: torch.nn.Module, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(77 + step)
    return {n: torch.randn(p.shape, generator=g) * (1 + i % 3) for i, (n, p) in enumerate(model.named_parameters())}


def sharded_stage(base, mesh: Mesh, ep: int, moments: str):
    model = copy.deepcopy(base)
    shard_for_test(model, mesh.ep_group, mesh.ep_rank, ep)
    stage = stage_view(model, mesh.pp_rank, mesh.pp) if mesh.pp > 1 else model
    sync = GradSync(mesh, stage)
    return stage, sync, ZeroAdamW(sync, LRS[0], BETAS, EPS, WD, moment_dtype=moments)


def zero_step(sync: GradSync, opt: ZeroAdamW, grads: dict, step: int) -> None:
    for name, copies in sync.params.items():
        g = expert_slice(sync, name, grads[name])
        for p in copies:
            p.grad = g.clone()
    for group in opt.param_groups:
        group["lr"] = LRS[step]
    opt.step()
    opt.zero_grad()


def union(d: dict) -> dict:
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, d)
    return {k: v for part in parts for k, v in part.items()}


def check_zero(pp: int, ep: int, moments: str = "fp32") -> None:
    """ZeRO-1 at layout (pp, ep) for two steps, checkpoint, one more step at layout (1, world) vs AdamW."""
    cfg = tiny_cfg()
    base = build_model(cfg, "fp32", seed=SEED)
    ref = copy.deepcopy(base)
    ref_opt = torch.optim.AdamW(param_groups(ref, WD), lr=LRS[0], betas=BETAS, eps=EPS) if moments == "fp32" \
        else AdamW(param_groups(ref, WD), lr=LRS[0], betas=BETAS, eps=EPS, moment_dtype=moments)
    mesh = Mesh(ParallelConfig(pp, ep), cfg)
    stage, sync, opt = sharded_stage(base, mesh, ep, moments)
    full_bytes = 8 * sum(dict(base.named_parameters())[n].numel() for n in sync.names)
    mem = opt.state_bytes() * mesh.dp / full_bytes
    errs = []
    for step in range(STEPS):
        grads = fake_grads(base, step)
        for n, p in ref.named_parameters():
            p.grad = grads[n].clone()
        for group in ref_opt.param_groups:
            group["lr"] = LRS[step]
        ref_opt.step()
        if step == STEPS - 1:  # resume from a layout-free checkpoint at another layout
            model_sd, opt_sd = union(stage.state_dict()), opt.state_dict()
            opt_sd["state"] = union(opt_sd["state"])
            saved_dtypes = sorted({str(t.dtype) for entry in opt_sd["state"].values() for t in entry.values()})
            mesh = Mesh(ParallelConfig(1, mesh.world_size), cfg)
            stage, sync, opt = sharded_stage(base, mesh, mesh.world_size, moments)
            stage.load_state_dict(model_sd, strict=False)
            opt.load_state_dict(opt_sd)
        zero_step(sync, opt, grads, step)
        ref_sd = ref.state_dict()
        errs.append(world_max(max(rel(v, ref_sd[k]) for k, v in stage.state_dict().items())))
    # Moments too: ZeRO's state dict per tensor name against the reference's state per parameter.
    mine = union(opt.state_dict()["state"])
    ref_state = {n: ref_opt.state[p] for n, p in ref.named_parameters()}
    moment_err = 0.0
    for name in sync.names:
        for kind in ("exp_avg", "exp_avg_sq"):
            held = expert_slice(sync, name, ref_state[name][kind])
            views = opt._keyed(name, held, held)
            moment_err = max(moment_err, *(rel(mine[k][kind], m) for k, (m, _) in views.items()))
    layout = f"{pp}:{ep}" + (f":{moments}" if moments != "fp32" else "")
    result(check="zero", layout=layout, dp=dist.get_world_size() // pp, step_errs=errs,
           mem_x_dp=world_max(mem), moment_err=world_max(moment_err), saved_dtypes=saved_dtypes)


def run(_env) -> None:
    refs: dict = {}
    args = sys.argv[1:]
    for kind, layouts in zip(args[::2], args[1::2]):
        for layout in (s.split(":") for s in layouts.split(",")):
            if kind == "train":
                check_train(int(layout[0]), int(layout[1]), layout[2], refs)
            else:
                check_zero(int(layout[0]), int(layout[1]), *layout[2:])


if __name__ == "__main__":
    main(run)
