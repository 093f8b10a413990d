"""What keeps the loss-free run's held-out MaxVio_global in ``bench.py balance`` from going lower.

    OMP_NUM_THREADS=1 python tools/benchmarks/_balance_floor.py [bench.py balance's options]

Trains the balance bench's loss-free variant through the bench's own set-up (same options and defaults,
except 2500 steps and V3's gamma 1e-3), then freezes the model and measures MaxVio_global (expert counts
pooled over 32 batches, mean over the MoE layers that route tokens) on three sets of batches: held-out A (the 32 after
training), held-out B (the 32 after those) and 32 training batches from the middle of the run. For each set:

* with the trained bias, and with it averaged over the last 5, 20 and 200 steps (if the sign update's
  step-to-step dither set the imbalance, averaging would remove it);
* ``noise``: the MaxVio a perfectly balanced router would show on the same number of batches, from each
  expert's batch-to-batch variance of its load (the floor no bias can go under);
* with a bias refitted on held-out A's pooled counts (sign steps of shrinking size on the frozen model): if
  it also balances B and the training batches better than the trained bias, a better bias exists and the
  per-batch sign update did not find it.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `benchmarks` importable
from benchmarks import balance  # noqa: E402
from moelib import ModelConfig  # noqa: E402
from moelib.train.data import BatchLoader  # noqa: E402

N_EVAL = 32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    balance.add_args(p)  # the bench's own options; its first --gamma is the loss-free run probed here
    p.set_defaults(steps=2500, gamma=[1e-3])
    args = p.parse_args()
    if args.val_batches < 2 * N_EVAL:
        raise SystemExit(f"_balance_floor: --val-batches must be at least {2 * N_EVAL} (two held-out sets)")
    cfg = ModelConfig.from_preset(args.preset, aux_loss_alpha=args.free_alpha)
    trainer, dataset, loader = balance.setup(cfg, args.gamma[0], args)
    model = trainer.model
    gates = {name: moe.gate for name, moe in model.moe_layers().items()}
    history = deque(maxlen=200)  # the bias after each of the last 200 steps
    for step in range(args.steps):
        trainer.train_step(*loader.next_batch())
        history.append({n: g.e_score_correction_bias.clone() for n, g in gates.items()})
        if step % 250 == 0:
            print(f"step {step}", flush=True)

    def batches(first: int) -> list:
        ld = BatchLoader(dataset, args.batch, seed=args.seed, consumed_samples=first * args.batch)
        return [ld.next_batch() for _ in range(N_EVAL)]

    sets = {"held-out A": batches(args.steps), "held-out B": batches(args.steps + N_EVAL),
            "training (middle)": batches(args.steps // 2)}

    def per_batch_counts(bs: list) -> dict[str, torch.Tensor]:
        return balance.routed_counts(model, bs)[0]

    def set_bias(bias: dict[str, torch.Tensor]) -> None:
        for name, g in gates.items():
            g.e_score_correction_bias.copy_(bias[name])

    rows = {}
    for window in (1, 5, 20, 200):
        set_bias({n: torch.stack([h[n] for h in list(history)[-window:]]).mean(0) for n in gates})
        rows[f"trained bias, mean of last {window}"] = {k: per_batch_counts(bs) for k, bs in sets.items()}
    set_bias(history[-1])
    step = 4 * args.gamma[0]
    for _ in range(14):  # refit on held-out A only
        for name, c in per_batch_counts(sets["held-out A"]).items():
            gates[name].update_bias(c.sum(0), step)
        step *= 0.7
    rows["bias refitted on held-out A"] = {k: per_batch_counts(bs) for k, bs in sets.items()}

    print(f"\nMaxVio_global over {N_EVAL} batches of {args.batch} x {args.seq} tokens, loss-free gamma "
          f"{args.gamma[0]:g}, "
          f"{args.steps} steps, seed {args.seed}")
    print(f"{'bias':<34}" + "".join(f"{k:>20}" for k in sets))
    for label, by_set in rows.items():
        print(f"{label:<34}" + "".join(f"{balance.global_max_vio(c):>20.4f}" for c in by_set.values()))
    first = rows["trained bias, mean of last 1"]
    print(f"{'noise (balanced router)':<34}" + "".join(f"{balance.sampling_floor(c):>20.4f}" for c in first.values()))


if __name__ == "__main__":
    main()
