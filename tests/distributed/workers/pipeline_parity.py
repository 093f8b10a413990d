"""Worker: distributed training (pipeline x EP x DP) against single-process training of the same model.

    pipeline_parity.py "NAME [--pp N] [--ep N] [--schedule S] ..." ...

Each argument is one layout: a name, then its flags (below). The layouts run one after another in this job
(mpirun's start costs more than a layout's training). For each, every rank trains its share; every rank
also trains the full model in one process on the whole global batch. Prints one JSON line per rank and
layout with the per-step losses and the max relative parameter error vs the reference.
"""

import argparse
import json
import shlex
import sys

import torch
import torch.distributed as dist

from moelib import ModelConfig, TrainConfig
from moelib.config import ParallelConfig
from moelib.train.parallel_trainer import ParallelTrainer
from moelib.train.trainer import Trainer

p = argparse.ArgumentParser()
p.add_argument("--pp", type=int, default=1)
p.add_argument("--ep", type=int, default=1)
p.add_argument("--schedule", default="1f1b")
p.add_argument("--microbatches", type=int, default=None)
p.add_argument("--mbs", type=int, default=1)
p.add_argument("--steps", type=int, default=3)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--mtp", type=int, default=1)
p.add_argument("--adam-eps", type=float, default=1e-6)


def parity(name: str, args: argparse.Namespace) -> dict:
    model_cfg = ModelConfig.from_preset(
        "tiny", vocab_size=256, hidden_size=64, num_hidden_layers=args.layers, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        num_attention_heads=2, num_nextn_predict_layers=args.mtp, aux_loss_alpha=1e-2, init_std=0.05)
    train_cfg = TrainConfig(micro_batch_size=args.mbs, seq_length=16, train_iters=args.steps, lr=3e-3, min_lr=3e-4,
                            lr_warmup_iters=1, bias_update_speed=1e-2, precision={"backend": "fp32"}, seed=11,
                            adam_eps=args.adam_eps)
    par = ParallelConfig(pipeline_model_parallel_size=args.pp, expert_model_parallel_size=args.ep,
                         pipeline_schedule=args.schedule, num_microbatches=args.microbatches)
    trainer = ParallelTrainer(model_cfg, train_cfg, par)
    mesh = trainer.mesh
    G = trainer.global_batch_size
    gen = torch.Generator().manual_seed(5)
    data = [torch.randint(0, model_cfg.vocab_size, (G, train_cfg.seq_length + 1), generator=gen)
            for _ in range(args.steps)]
    local = trainer.local_batch_size
    losses = []
    for batch in data:
        mine = batch[mesh.dp_rank * local:(mesh.dp_rank + 1) * local]
        losses.append(trainer.train_step(mine[:, :-1], mine[:, 1:]).loss)

    # The reference: one process, the whole global batch as one micro-batch.
    ref = Trainer(model_cfg, TrainConfig(**{**train_cfg.__dict__, "micro_batch_size": G}))
    ref_losses = [ref.train_step(b[:, :-1], b[:, 1:]).loss for b in data]
    ref_state = ref.model.state_dict()
    worst, worst_name = 0.0, None
    for key, t in trainer.state_dict().items():
        want = ref_state[key]
        err = float((t.double() - want.double()).norm() / (want.double().norm() + 1e-12))
        if err > worst:
            worst, worst_name = err, key
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    return {"name": name, "rank": dist.get_rank(), "losses": losses, "ref_losses": ref_losses,
            "loss_rel_err": loss_err, "param_rel_err": worst, "worst": worst_name, "layout": mesh.describe()}


for layout in sys.argv[1:]:
    name, *flags = shlex.split(layout)
    print(json.dumps(parity(name, p.parse_args(flags))), flush=True)
sys.exit(0)
