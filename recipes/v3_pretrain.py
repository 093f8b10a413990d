"""DeepSeek-V3-style pretraining.

    python recipes/v3_pretrain.py                      # tiny model on the default corpus
    python recipes/v3_pretrain.py --config small --train-iters 1000 --precision bf16

Runs in one process for now (the MPI launch with pipeline and expert parallelism builds on it). With
no --data-path it trains on the embedded default corpus: this interpreter's standard-library sources,
tokenised with a byte-level BPE trained locally on first use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelib import ModelConfig, MoelibError, TrainConfig  # noqa: E402
from moelib.config import PRECISION_BACKENDS, PRESETS  # noqa: E402
from moelib.train.checkpoint import save_checkpoint  # noqa: E402
from moelib.train.data import BatchLoader, PackedDataset, default_corpus  # noqa: E402
from moelib.train.tokenizer import Tokenizer  # noqa: E402
from moelib.train.trainer import Trainer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--train-iters", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=3e-4)
    p.add_argument("--lr-warmup-iters", type=int, default=30)
    p.add_argument("--precision", default="bf16", choices=PRECISION_BACKENDS)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data-path", help="prefix of a Megatron indexed dataset (.bin/.idx); default: the embedded corpus")
    p.add_argument("--tokenizer", help="tokenizer.json of --data-path (for its vocabulary size and EOD id)")
    p.add_argument("--save", default="checkpoints/v3_pretrain", help="directory for the final checkpoint")
    p.add_argument("--log-interval", type=int, default=25)
    p.add_argument("--log-json", help="append one JSON line per logged step to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model_cfg = ModelConfig.from_preset(args.config)
    train_cfg = TrainConfig(micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
                            train_iters=args.train_iters, lr=args.lr, min_lr=args.min_lr,
                            lr_warmup_iters=args.lr_warmup_iters, seed=args.seed, log_interval=args.log_interval,
                            precision={"backend": args.precision})
    if args.data_path:
        data_prefix, tokenizer_path = args.data_path, args.tokenizer
    else:
        print(f"default corpus: standard-library sources, BPE vocabulary {model_cfg.vocab_size} (cached)")
        data_prefix, tokenizer_path = default_corpus(model_cfg.vocab_size)
    eod = None
    if tokenizer_path:
        tok = Tokenizer.from_file(tokenizer_path)
        if tok.vocab_size > model_cfg.vocab_size:
            raise MoelibError(f"tokenizer {tokenizer_path} has {tok.vocab_size} tokens, more than the model's "
                              f"vocab_size {model_cfg.vocab_size}")
        eod = tok.eod
    dataset = PackedDataset(data_prefix, train_cfg.seq_length, eod_id=eod, vocab_size=model_cfg.vocab_size)
    loader = BatchLoader(dataset, train_cfg.micro_batch_size, seed=train_cfg.seed)
    torch.manual_seed(train_cfg.seed)
    trainer = Trainer(model_cfg, train_cfg)
    counts = model_cfg.param_counts()
    print(f"model {args.config}: {counts['total'] / 1e6:.1f}M parameters ({counts['activated'] / 1e6:.1f}M activated, "
          f"MTP {counts['mtp'] / 1e6:.1f}M), precision {args.precision}, {dataset.num_tokens:,} tokens of data")
    log_file = open(args.log_json, "a") if args.log_json else None

    def log(r):
        print(f"step {r.step:5d} | loss {r.lm_loss:.4f} | mtp {r.mtp_loss:.4f} | lr {r.lr:.2e} | "
              f"grad norm {r.grad_norm:.2f} | MaxVio {r.max_vio:.3f} | {r.tokens_per_s:,.0f} tok/s", flush=True)
        if log_file:
            log_file.write(json.dumps(vars(r)) + "\n")
            log_file.flush()

    start = time.perf_counter()
    results = list(trainer.train(loader, log=log))
    first, last = results[0].lm_loss, sum(r.lm_loss for r in results[-10:]) / min(10, len(results))
    path = save_checkpoint(args.save, trainer.model, model_cfg, trainer.step,
                           extra={"train": {"consumed_samples": loader.consumed_samples},
                                  "data": loader.state_dict()})
    print(f"done: {len(results)} steps in {time.perf_counter() - start:.0f}s, loss {first:.3f} -> {last:.3f} "
          f"(mean of the last 10 steps)")
    print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MoelibError as e:
        print(f"v3_pretrain: error: {e}", file=sys.stderr)
        sys.exit(1)
