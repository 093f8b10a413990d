"""Why every router in ``bench.py balance`` collapses onto top_k experts in its first ~25 steps.

    OMP_NUM_THREADS=1 python tools/benchmarks/_router_collapse.py [--alpha A] [--gamma G] [--steps N]

Trains the tiny preset as the balance bench does (bf16, 8 x 128 tokens, its seed and batches) and every
5 steps prints, for the first two MoE layers, what the router sees:

* ``common``: |mean_t x_t|^2 / mean_t |x_t|^2 of the gate inputs x_t, the share of their energy that every
  token has in common (0 for unrelated tokens, 1 when all are the same vector);
* ``expert``: the standard deviation over experts of the token-averaged gate logit, the part of the routing
  decision that is the same for every token;
* ``token``: the mean over experts of the per-token standard deviation of the logits around that average,
  the part that differs between tokens.

When ``expert`` exceeds ``token`` every token picks the same experts (MaxVio near its top_k maximum).
"""

from __future__ import annotations

import argparse

from moelib import ModelConfig, TrainConfig
from moelib.train.data import BatchLoader, default_dataset
from moelib.train.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alpha", type=float, default=0.0, help="sequence-wise aux loss weight")
    p.add_argument("--gamma", type=float, default=0.0, help="bias update speed")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    cfg = ModelConfig.from_preset("tiny", aux_loss_alpha=args.alpha)
    tc = TrainConfig(micro_batch_size=8, seq_length=128, train_iters=args.steps, seed=args.seed,
                     bias_update_speed=args.gamma, precision={"backend": "bf16"})
    trainer = Trainer(cfg, tc)
    loader = BatchLoader(default_dataset(cfg.vocab_size, 128), 8, seed=args.seed)
    gate_inputs = {}
    layers = dict(list(trainer.model.moe_layers().items())[:2])
    for name, moe in layers.items():
        moe.gate.register_forward_hook(lambda mod, inp, out, name=name: gate_inputs.update({name: inp[0].detach()}))
    for step in range(args.steps + 1):
        r = trainer.train_step(*loader.next_batch())
        if step % 5:
            continue
        parts = []
        for name, moe in layers.items():
            x = gate_inputs[name].float()
            common = float(x.mean(0).pow(2).sum() / x.pow(2).sum(1).mean())
            logits = x @ moe.gate.weight.detach().float().t()
            mean = logits.mean(0)
            parts.append(f"{name}: common {common:.2f} expert {float(mean.std()):.3f} "
                         f"token {float((logits - mean).std(0).mean()):.3f}")
        print(f"step {step:3d}  lr {r.lr:.1e}  loss {r.lm_loss:.3f}  MaxVio {r.max_vio:.2f}  " + "  ".join(parts),
              flush=True)


if __name__ == "__main__":
    main()
