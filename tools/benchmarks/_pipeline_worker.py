"""mpirun worker for ``bench.py pipeline``: trains a few steps with one schedule and writes the last step's
per-rank timeline (compute ops, receive waits, all-to-alls in flight) as JSON."""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moelib import ModelConfig, TrainConfig  # noqa: E402
from moelib.config import ParallelConfig  # noqa: E402
from moelib.train.parallel_trainer import ParallelTrainer  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--schedule", required=True)
p.add_argument("--pp", type=int, default=2)
p.add_argument("--ep", type=int, default=2)
p.add_argument("--microbatches", type=int, default=8)
p.add_argument("--mbs", type=int, default=2)
p.add_argument("--seq", type=int, default=128)
p.add_argument("--steps", type=int, default=3)
p.add_argument("--out", required=True)
args = p.parse_args()

model_cfg = ModelConfig.from_preset("tiny")
train_cfg = TrainConfig(micro_batch_size=args.mbs, seq_length=args.seq, train_iters=args.steps, lr=1e-3, min_lr=1e-4,
                        lr_warmup_iters=1, precision={"backend": "fp32"})
par = ParallelConfig(pipeline_model_parallel_size=args.pp, expert_model_parallel_size=args.ep,
                     pipeline_schedule=args.schedule, num_microbatches=args.microbatches)
trainer = ParallelTrainer(model_cfg, train_cfg, par, record_timeline=True)
gen = torch.Generator().manual_seed(0)
for _ in range(args.steps):
    batch = torch.randint(0, model_cfg.vocab_size, (trainer.local_batch_size, args.seq + 1), generator=gen)
    result = trainer.train_step(batch[:, :-1], batch[:, 1:])
events = [dict(e, rank=dist.get_rank()) for e in result.events]
everyone = [None] * dist.get_world_size()
dist.all_gather_object(everyone, events)
if dist.get_rank() == 0:
    Path(args.out).write_text(json.dumps({"layout": trainer.mesh.describe(), "tokens_per_s": result.tokens_per_s,
                                          "events": [e for evs in everyone for e in evs]}))
