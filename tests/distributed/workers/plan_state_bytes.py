"""mpirun worker: the bytes a real ParallelTrainer allocates for weights, gradients and optimizer moments.

    plan_state_bytes.py PRESET[/narrow]:PP:EP:SCHEDULE[,...]

For each case: build the trainer, run one step (so every gradient exists), and print per rank
``RESULT {"model", "layout", "pp_rank", "master_weights", "gradients", "optimizer", "ema_host"}`` from the tensors
themselves. tests/distributed/test_plan_state_bytes.py compares them with moelib.plan.memory.state_bytes.
``/narrow`` keeps the preset's layers, experts and routing but makes every width small: small/narrow is cut
into the same uneven stages as small (2, 2, 3 and 1 layers) at a fraction of the bytes to initialise and update.
"""

from __future__ import annotations

import json
import sys

import torch

from moelib.config import ModelConfig, ParallelConfig, TrainConfig
from moelib.train.parallel_trainer import ParallelTrainer

MOMENTS = {"dualpipe": "bf16", "1f1b": "fp32"}  # both moment widths are exercised
NARROW = dict(vocab_size=1024, hidden_size=64, intermediate_size=192, num_attention_heads=2, q_lora_rank=32,
              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_intermediate_size=32)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    for case in sys.argv[1].split(","):
        preset, layout = case.split(":", 1)
        run(preset, layout)


def run(preset: str, layout: str) -> None:
    pp, ep, schedule = layout.split(":")
    name, _, narrow = preset.partition("/")
    cfg = ModelConfig.from_preset(name, **(NARROW if narrow == "narrow" else {}))
    par = ParallelConfig(pipeline_model_parallel_size=int(pp), expert_model_parallel_size=int(ep),
                         pipeline_schedule=schedule)
    train = TrainConfig(micro_batch_size=1, seq_length=8, precision="fp32", moment_dtype=MOMENTS[schedule],
                        ema_decay=0.9, seed=1)
    trainer = ParallelTrainer(cfg, train, par)
    gen = torch.Generator().manual_seed(trainer.mesh.dp_rank)
    tokens = torch.randint(0, cfg.vocab_size, (trainer.local_batch_size, 9), generator=gen)
    trainer.train_step(tokens[:, :-1], tokens[:, 1:])
    params = [p for m in trainer.models.values() for p in m.parameters()]
    print("RESULT " + json.dumps({
        "model": cfg.to_dict(), "layout": layout, "pp_rank": trainer.mesh.pp_rank, "world": trainer.mesh.world_size,
        "moment_dtype": train.moment_dtype, "seq_length": train.seq_length, "master_weights": tensor_bytes(params),
        "gradients": tensor_bytes(p.grad for p in params), "optimizer": trainer.optimizer.state_bytes(),
        "ema_host": tensor_bytes(trainer.ema.state_dict().values()),
    }), flush=True)

if __name__ == "__main__":
    main()
