"""Worker: a checkpoint's held-out metrics under several PP x EP layouts against one process.

Rank 0 trains the model 2 steps in one process, saves a checkpoint and evaluates the whole model on the
held-out batches (the reference). Then, for each layout named on the command line, every rank builds a
ParallelTrainer, loads the checkpoint and evaluates its share of the same batches through the pipeline.
Rank 0 prints one JSON line per layout with the metrics and the reference.
"""

import argparse
import json
import sys
import tempfile

import torch
import torch.distributed as dist

from moelib import ModelConfig, TrainConfig
from moelib.config import ParallelConfig
from moelib.model import build_model
from moelib.parallel.launch import init
from moelib.train.checkpoint import CheckpointReader, save_checkpoint
from moelib.train.evaluate import evaluate, evaluate_model
from moelib.train.parallel_trainer import ParallelTrainer
from moelib.train.trainer import Trainer

p = argparse.ArgumentParser()
p.add_argument("layouts", nargs="+", help="PP,EP,schedule,micro-batches")
p.add_argument("--global-batch", type=int, default=8)
args = p.parse_args()

model_cfg = ModelConfig.from_preset(
    "tiny", vocab_size=256, hidden_size=64, num_hidden_layers=4, intermediate_size=96, moe_intermediate_size=32,
    n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, q_lora_rank=32, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_attention_heads=2, num_nextn_predict_layers=1,
    aux_loss_alpha=1e-2, init_std=0.05)
train_cfg = TrainConfig(micro_batch_size=1, seq_length=16, train_iters=2, lr=3e-3, lr_warmup_iters=1,
                        bias_update_speed=1e-2, precision={"backend": "fp32"}, seed=11)
env = init()
G, T = args.global_batch, train_cfg.seq_length
gen = torch.Generator().manual_seed(5)
rows = [torch.randint(0, model_cfg.vocab_size, (G, T + 1), generator=gen) for _ in range(4)]
train_data, held_out = rows[:2], [(r[:, :-1], r[:, 1:]) for r in rows[2:]]

root = [tempfile.mkdtemp() if env.rank == 0 else None]
dist.broadcast_object_list(root)
reference, state = None, {}
if env.rank == 0:
    ref = Trainer(model_cfg, TrainConfig(**{**train_cfg.__dict__, "micro_batch_size": G}))
    for r in train_data:
        ref.train_step(r[:, :-1], r[:, 1:])
    state = ref.model.state_dict()
save_checkpoint(root[0], state, model_cfg, 2)  # collective: rank 0 holds every tensor
if env.rank == 0:
    whole, reader = build_model(model_cfg, "fp32"), CheckpointReader(root[0])
    whole.load_state_dict({k: reader.get(k) for k in whole.state_dict()})
    reference = evaluate_model(whole, held_out, micro_batch_size=1)

for layout in args.layouts:
    pp, ep, schedule, m = layout.split(",")
    par = ParallelConfig(pipeline_model_parallel_size=int(pp), expert_model_parallel_size=int(ep),
                         pipeline_schedule=schedule, num_microbatches=int(m))
    trainer = ParallelTrainer(model_cfg, train_cfg, par)
    trainer.load_checkpoint(CheckpointReader(root[0]))
    local = G // trainer.mesh.dp
    mine = [(t[trainer.mesh.dp_rank * local:(trainer.mesh.dp_rank + 1) * local],
             y[trainer.mesh.dp_rank * local:(trainer.mesh.dp_rank + 1) * local]) for t, y in held_out]
    result = evaluate(trainer, mine)
    agree = [None] * env.world_size
    dist.all_gather_object(agree, result.__dict__)
    if env.rank == 0:
        print(json.dumps({"layout": trainer.mesh.describe(), "result": result.__dict__,
                          "reference": reference.__dict__, "same_on_all_ranks": all(a == agree[0] for a in agree)}),
              flush=True)
sys.exit(0)
