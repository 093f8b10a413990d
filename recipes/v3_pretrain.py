"""DeepSeek-V3-style pretraining, on one process or many.

    python recipes/v3_pretrain.py                          # tiny model, default corpus, one process
    mpirun -n 16 python recipes/v3_pretrain.py             # the same, PP x EP x DP chosen for 16 ranks
    mpirun -n 8 python recipes/v3_pretrain.py --config small --pipeline-model-parallel-size 2 \\
        --expert-model-parallel-size 4 --train-iters 1000
    python recipes/v3_pretrain.py --load checkpoints/from_hf   # continue an import: the model is the checkpoint's

With no --data-path it trains on the embedded default corpus: this interpreter's standard-library
sources, tokenised with a byte-level BPE trained locally on first use; 5 % of its files are held out for
validation and 5 % for the test (--split). The valid part is evaluated every --eval-interval steps, the test
part at the end; the log (--log-json, default log.jsonl in --save) is plotted to training.png beside the
checkpoints (tools/plot_run.py does it for any log). A run that reaches --train-iters ends with the final
checkpoint's greedy continuation of a prompt from the valid part (--sample-tokens). Without layout flags the
layout comes from moelib.parallel.mesh.auto_layout for the world size.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelib import ConfigError, MoelibError  # noqa: E402
from moelib.config import PIPELINE_SCHEDULES, PRECISION_BACKENDS, PRESETS, RecipeConfig  # noqa: E402
from moelib.inference.sample import sample_line  # noqa: E402
from moelib.parallel import launch, report  # noqa: E402
from moelib.parallel.mesh import auto_layout  # noqa: E402
from moelib.precision import apex  # noqa: E402
from moelib.train import preflight  # noqa: E402
from moelib.train.checkpoint import CheckpointReader, prune_checkpoints, resolve, save_checkpoint  # noqa: E402
from moelib.train.checkpoint_model import resolve_model_config  # noqa: E402
from moelib.train.data import BatchLoader, default_corpus  # noqa: E402
from moelib.train.evaluate import Evaluation  # noqa: E402
from moelib.train.faults import agree  # noqa: E402
from moelib.train.logger import TrainingLogger  # noqa: E402
from moelib.train.loop import LoopOptions, train_loop  # noqa: E402
from moelib.train.metrics import measure_matmul_flops, model_flops_per_token  # noqa: E402
from moelib.train.plot import plot_run  # noqa: E402
from moelib.train.schedules import Schedules, schedule_for_run  # noqa: E402
from moelib.train.splits import DEFAULT_CORPUS_SPLIT, DEFAULT_SPLIT, build_splits, parse_split  # noqa: E402
from moelib.train.tokenizer import Tokenizer  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"a YAML file, or the name of one in recipes/configs ({', '.join(PRESETS)}); "
                                    "default tiny, and with --load but no --config the model is the checkpoint's")
    # Flags left unset keep the YAML's value.
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="sequences per step; sets micro-batches per data-parallel rank = G / (micro-batch size x "
                        "DP) for whatever layout the run gets (default: micro-batch size x micro-batches x DP)")
    p.add_argument("--rampup-batch-size", nargs=3, type=int, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="grow the global batch from START by INCREMENT over SAMPLES samples (as Megatron)")
    p.add_argument("--seq-length", type=int)
    p.add_argument("--train-iters", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--min-lr", type=float)
    p.add_argument("--lr-warmup-iters", type=int)
    p.add_argument("--precision", choices=PRECISION_BACKENDS)
    p.add_argument("--seed", type=int)
    p.add_argument("--moment-dtype", choices=("fp32", "bf16"), help="AdamW moment storage (V3: bf16)")
    p.add_argument("--ema-decay", type=float, help="keep an EMA of the parameters in host memory (0: off)")
    p.add_argument("--recompute", choices=("none", "selective", "full"),
                   help="activation recomputation: selective = V3's RMSNorm, MLA up-projections, SwiGLU")
    p.add_argument("--pipeline-model-parallel-size", type=int)
    p.add_argument("--expert-model-parallel-size", type=int)
    p.add_argument("--pipeline-schedule", choices=PIPELINE_SCHEDULES)
    p.add_argument("--num-microbatches", type=int)
    p.add_argument("--data-path", help="prefix of a Megatron indexed dataset (.bin/.idx); default: the embedded corpus")
    p.add_argument("--tokenizer", help="tokenizer.json of --data-path (for its vocabulary size and EOD id)")
    p.add_argument("--split", help=f"train,valid,test weights over documents (default {DEFAULT_SPLIT}; "
                                   f"the embedded corpus: {DEFAULT_CORPUS_SPLIT}, by source file)")
    p.add_argument("--valid-data-path", help="prefix of a held-out corpus for validation (then --data-path is all "
                                             "training data)")
    p.add_argument("--test-data-path", help="prefix of a held-out corpus tested at the end")
    p.add_argument("--eval-interval", type=int, help="evaluate on the valid split every N steps (default: a tenth "
                                                     "of --train-iters; 0: only at the end)")
    p.add_argument("--eval-iters", type=int, default=4, help="global batches per evaluation (0: no evaluation)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --load on valid and test, then exit")
    p.add_argument("--save", default="checkpoints/v3_pretrain", help="directory for checkpoints")
    p.add_argument("--save-interval", type=int, default=0, help="also save every N steps (0: off)")
    p.add_argument("--save-interval-minutes", type=float, default=30.0,
                   help="also save when this many minutes have passed since the last save (0: off)")
    p.add_argument("--keep-last", type=int, default=3, help="keep this many newest checkpoints")
    p.add_argument("--exit-interval", type=int, default=0,
                   help="save and stop once the step is a multiple of N (the schedules still span --train-iters)")
    p.add_argument("--load", help="resume from this checkpoint (a step directory or a --save directory)")
    p.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model config from --load's checkpoint, the training settings from --config")
    p.add_argument("--log-interval", type=int)
    p.add_argument("--log-json", help="rank 0 appends one JSON line per logged step and evaluation to this file "
                                      "(default: log.jsonl in --save; plotted there as training.png at the end)")
    p.add_argument("--tensorboard-dir", help="also write TensorBoard event files here (needs tensorboard)")
    p.add_argument("--peak-tflops", type=float, help="per-rank peak for MFU (default: a matmul measured at start)")
    p.add_argument("--max-skipped-steps", type=int, default=10,
                   help="stop after this many steps in a row with a non-finite loss or gradient (0: never)")
    p.add_argument("--sample-tokens", type=int, default=64,
                   help="at the end of training, rank 0 prints this many greedy tokens of the final checkpoint "
                        "after a prompt from the valid part, decoded (0: off; not after a stop or without a "
                        "valid part or tokenizer)")
    p.add_argument("--collective-timeout", type=float,
                   help=f"seconds a collective waits for the other ranks (default: ${launch.TIMEOUT_ENV}, else 600)")
    args = p.parse_args(argv)
    preflight.check_intervals(save_interval=args.save_interval, exit_interval=args.exit_interval,
                              keep_last=args.keep_last, log_interval=args.log_interval,
                              save_interval_minutes=args.save_interval_minutes, sample_tokens=args.sample_tokens)
    return args


def load_config(args) -> RecipeConfig:
    config = args.config or "tiny"
    path = Path(config) if config.endswith((".yaml", ".yml")) else CONFIGS / f"{config}.yaml"
    if not path.is_file():
        raise MoelibError(f"--config {config}: no such YAML file ({path}); known: "
                          f"{', '.join(p.stem for p in sorted(CONFIGS.glob('*.yaml')))}")
    train = {"micro_batch_size": args.micro_batch_size, "seq_length": args.seq_length,
             "train_iters": args.train_iters, "lr": args.lr, "min_lr": args.min_lr,
             "lr_warmup_iters": args.lr_warmup_iters, "seed": args.seed, "log_interval": args.log_interval,
             "recompute": args.recompute, "moment_dtype": args.moment_dtype, "ema_decay": args.ema_decay,
             "precision": {"backend": args.precision} if args.precision else None}
    parallel = {"pipeline_model_parallel_size": args.pipeline_model_parallel_size,
                "expert_model_parallel_size": args.expert_model_parallel_size,
                "pipeline_schedule": args.pipeline_schedule, "num_microbatches": args.num_microbatches}
    if parallel["pipeline_model_parallel_size"] and not parallel["pipeline_schedule"]:
        pp = parallel["pipeline_model_parallel_size"]
        parallel["pipeline_schedule"] = "dualpipe" if pp > 1 and pp % 2 == 0 else "1f1b"
    return RecipeConfig.from_yaml(path, {"train": train, "parallel": parallel,
                                         "data": {"data_path": args.data_path, "tokenizer": args.tokenizer}})


def main(argv=None) -> int:

    from moelib.train.parallel_trainer import ParallelTrainer

    args = parse_args(argv)
    check_eval_flags(args)
    env = launch.init(timeout_s=args.collective_timeout)
    say = launch.rank_zero_print
    run = load_config(args)
    model_cfg = resolve_model_config(run.model, args.config, args.load, args.use_checkpoint_args)
    train_cfg, data_cfg = run.train, run.data
    run_record = {"model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg),
                  "data": dataclasses.asdict(data_cfg)}
    par = run.parallel or auto_layout(env.world_size, model_cfg)
    par.validate(env.world_size, model_cfg)
    if args.global_batch_size:
        par = layout_for_batch(par, args.global_batch_size, train_cfg.micro_batch_size, env.world_size, model_cfg)
    check_outputs(args, model_cfg, train_cfg, run_record, env)
    parts, tok, tokenizer_path = load_data(args, data_cfg, model_cfg, train_cfg.seq_length)
    dataset = parts["train"]
    trainer = ParallelTrainer(model_cfg, train_cfg, par)
    mesh = trainer.mesh
    global_batch = trainer.global_batch_size
    schedule_cfg = schedule_for_run(train_cfg, global_batch, rampup=args.rampup_batch_size, overrides=run.schedule)
    check_batch_sizes(schedule_cfg, train_cfg.micro_batch_size, par, mesh.dp)
    schedules = Schedules(schedule_cfg)
    loader = BatchLoader(dataset, global_batch, seed=train_cfg.seed, dp_rank=mesh.dp_rank, dp_size=mesh.dp)
    if args.load:
        report.mark("--load")
        reader = CheckpointReader(args.load)
        trainer.load_checkpoint(reader)
        agree(False)  # every rank has loaded before any says so (a rank that failed ends the job instead)
        warn_if_reshaped(reader.manifest, train_cfg.train_iters, env)
        if "train" in reader.manifest:  # a training checkpoint: continue its data and schedules too
            loader.load_state_dict(reader.manifest["data"])
            schedules.load_state_dict(reader.manifest["schedule"])
            say(f"resumed from {reader.path} at step {trainer.step} ({reader.manifest['train']['layout']})")
        else:
            say(f"initialised from the weights of {reader.path} (no training state: fresh optimizer and data)")

    def save() -> Path:
        report.mark(f"checkpoint save at step {trainer.step}")
        tensors, meta = trainer.checkpoint_state()
        path = save_checkpoint(args.save, tensors, model_cfg, trainer.step, tokenizer=tokenizer_path,
                               extra={"train": meta, "data": loader.state_dict(), "schedule": schedules.state_dict(),
                                      "schedule_config": schedule_cfg.to_dict(), "run": run_record})
        if env.is_main:
            prune_checkpoints(args.save, args.keep_last)
        return path
    counts = model_cfg.param_counts()
    model_name = args.config or (f"of {args.load}" if args.load else "tiny")
    say(f"model {model_name}: {counts['total'] / 1e6:.1f}M parameters ({counts['activated'] / 1e6:.1f}M activated, "
        f"MTP {counts['mtp'] / 1e6:.1f}M); {env.world_size} rank(s): {mesh.describe()}; "
        f"precision {train_cfg.precision.backend}; "
        f"global batch {global_batch} x {train_cfg.seq_length} tokens; {dataset.num_tokens:,} tokens of data")
    if torch.device(env.device).type == "cuda":
        say(apex.status())
    # MFU against the peak the user gives, else the dense matmul rate measured here (per rank x ranks).
    peak = (args.peak_tflops * 1e12 if args.peak_tflops else
            measure_matmul_flops(torch.bfloat16 if train_cfg.precision.backend != "fp32" else torch.float32,
                                 device=env.device)) * env.world_size
    json_path = Path(args.log_json or Path(args.save) / "log.jsonl")
    if env.is_main:
        json_path.parent.mkdir(parents=True, exist_ok=True)
    log = TrainingLogger(train_cfg.train_iters, trainer.step, train_cfg.log_interval, enabled=env.is_main,
                         json_path=str(json_path), tensorboard_dir=args.tensorboard_dir,
                         flops_per_token=model_flops_per_token(model_cfg, train_cfg.seq_length,
                                                               train_cfg.mtp_loss_weight > 0),
                         peak_flops=peak)
    evals = Evaluation(trainer, parts, global_batch, args.eval_iters, seed=train_cfg.seed, log=log)
    if args.eval_only:
        log.write(f"--eval-only: {args.load} at step {trainer.step}")
        try:
            evals.run("valid", consumed_tokens=schedules.state.consumed_tokens)
            evals.run("test", consumed_tokens=schedules.state.consumed_tokens)
        finally:
            log.close()
        return 0
    interval = train_cfg.train_iters // 10 if args.eval_interval is None else args.eval_interval
    opts = LoopOptions(train_cfg.train_iters, train_cfg.log_interval, eval_interval=interval,
                       exit_interval=args.exit_interval, save_interval=args.save_interval,
                       save_interval_minutes=args.save_interval_minutes, max_skipped_steps=args.max_skipped_steps)
    start = time.perf_counter()
    try:
        outcome = train_loop(trainer, schedules, loader, log, evals, save, opts)
    finally:
        log.close()
    path = save()
    if outcome.recent:
        recent = outcome.recent
        say(f"done: step {trainer.step}, {time.perf_counter() - start:.0f}s, loss {outcome.first_loss:.3f} -> "
            f"{sum(recent) / len(recent):.3f} (mean of the last {len(recent)} steps)")
    if evals.last:
        say("held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in evals.last.items() if k.endswith(("_loss", "_ppl"))
                                     and "_mtp" not in k))
    say(f"checkpoint: {path}")
    if env.is_main:
        try:
            say(f"plot: {plot_run(json_path, Path(args.save) / 'training.png')}")
        except MoelibError as e:
            say(f"no plot: {e}")
    # Rank 0 alone, after the last collective (the save): the other ranks finish meanwhile.
    if env.is_main and args.sample_tokens and not outcome.stopped and parts["valid"] is not None and tok is not None:
        say(sample_line(path, parts["valid"], tok, args.sample_tokens,
                        "fp32" if train_cfg.precision.backend == "fp32" else "bf16"))
    return 0


def load_data(args, data_cfg, model_cfg, seq_length: int):
    """The train/valid/test splits, the tokenizer (None for pre-tokenised data without one) and its path; the
    default corpus (built and cached on first use) when no --data-path is given."""
    if data_cfg.data_path:
        data_prefix, tokenizer_path = data_cfg.data_path, data_cfg.tokenizer
    else:
        began = time.perf_counter()
        data_prefix, tokenizer_path = default_corpus(model_cfg.vocab_size)
        built = time.perf_counter() - began
        cached = "cached" if built < 5 else f"built in {built:.0f} s, cached for the next runs"
        launch.rank_zero_print(f"default corpus: standard-library sources, BPE vocabulary {model_cfg.vocab_size} "
                               f"({cached})")
    eod, tok = None, None
    if tokenizer_path:
        tok = Tokenizer.from_file(tokenizer_path)
        if tok.vocab_size > model_cfg.vocab_size:
            raise MoelibError(f"tokenizer {tokenizer_path} has {tok.vocab_size} tokens, more than the model's "
                              f"vocab_size {model_cfg.vocab_size}")
        eod = tok.eod
    parts = build_splits(data_prefix, seq_length, eod_id=eod, vocab_size=model_cfg.vocab_size,
                         split=args.split, default_split=DEFAULT_SPLIT if data_cfg.data_path else DEFAULT_CORPUS_SPLIT,
                         valid_path=args.valid_data_path, test_path=args.test_data_path,
                         evaluating=args.eval_iters > 0)
    return parts, tok, tokenizer_path


def check_eval_flags(args) -> None:
    """The evaluation flags' own rules, before any rank starts work (the data-dependent ones: build_splits)."""
    if args.split is not None:
        parse_split(args.split)
    if args.eval_only and not args.load:
        raise MoelibError("--eval-only needs --load (the checkpoint to evaluate)")
    if args.eval_iters < 0 or (args.eval_only and args.eval_iters == 0):
        raise MoelibError(f"--eval-iters {args.eval_iters}: must be a positive number of batches"
                          + (" with --eval-only" if args.eval_only else " (or 0: no evaluation)"))
    if args.eval_interval is not None and args.eval_interval < 0:
        raise MoelibError(f"--eval-interval {args.eval_interval}: must be >= 0 (0: evaluate only at the end)")


def layout_for_batch(par, global_batch: int, micro_batch_size: int, world_size: int, model_cfg):
    """The layout with micro-batches per data-parallel rank = G / (b x DP), as Megatron derives them."""
    per_step = micro_batch_size * (world_size // par.pp)
    if global_batch < 1 or global_batch % per_step:
        raise MoelibError(f"--global-batch-size {global_batch} must be a positive multiple of micro-batch size x "
                          f"data-parallel size = {micro_batch_size} x {world_size // par.pp}")
    return with_microbatches(par, global_batch, per_step, "--global-batch-size", world_size, model_cfg)


def with_microbatches(par, batch: int, per_rank: int, flag: str, *validate_args):
    """``par`` running a batch of ``batch`` sequences as batch / per_rank micro-batches per data-parallel rank;
    a count the pipeline schedule rejects (ParallelConfig.validate owns that rule) is an error naming ``flag``."""
    try:
        out = dataclasses.replace(par, num_microbatches=batch // per_rank)
        out.validate(*validate_args)
    except ConfigError as e:
        raise MoelibError(f"{flag}: a batch of {batch} sequences gives {batch // per_rank} micro-batches per "
                          f"data-parallel rank, which the pipeline rejects: {e}") from None
    return out


def check_outputs(args, model_cfg, train_cfg, run_record: dict, env) -> None:
    """Fail in the first seconds, on every rank, for what would otherwise fail at the first save or log."""
    preflight.check_device(train_cfg.precision.backend)
    check_sample_tokens(args.sample_tokens, model_cfg)
    if not args.eval_only:  # an evaluation writes no checkpoint
        resumes = bool(args.load) and Path(args.save).resolve() in resolve(args.load).resolve().parents
        preflight.check_save_owner(args.save, {k: run_record[k] for k in ("model", "train")}, resumes)
        preflight.check_save_dir(args.save, preflight.checkpoint_bytes(model_cfg, train_cfg))
    if env.is_main and args.log_json:
        preflight.check_output_file(args.log_json, "--log-json")
    if env.is_main and args.tensorboard_dir:
        preflight.check_output_dir(args.tensorboard_dir, "--tensorboard-dir")


def check_sample_tokens(sample_tokens: int, model_cfg) -> None:
    """The end-of-run sample needs room for at least one prompt token in the model's positions."""
    if sample_tokens >= model_cfg.max_position_embeddings:
        raise MoelibError(f"--sample-tokens {sample_tokens} leaves no room for a prompt in the model's "
                          f"max_position_embeddings {model_cfg.max_position_embeddings}")


def warn_if_reshaped(manifest: dict, train_iters: int, env) -> None:
    """Raising (or lowering) --train-iters on resume stretches the LR, lambda and gamma schedules: say so."""
    before = manifest.get("run", {}).get("train", {}).get("train_iters")
    if env.is_main and before is not None and before != train_iters:
        print(f"v3_pretrain: warning: --train-iters {train_iters} differs from the checkpoint's run ({before}); "
              f"the LR and other schedules are reshaped to span {train_iters} steps from here on",
              file=sys.stderr, flush=True)


def check_batch_sizes(cfg, micro_batch_size: int, par, dp: int) -> None:
    """Every global batch the ramp produces must split into whole micro-batches per DP rank, in a number the
    pipeline schedule accepts (ParallelConfig.validate owns that rule); name the flag before any work starts."""
    if cfg.batch_start == cfg.batch_end:
        return  # the one batch size is --global-batch-size, already checked against the layout
    per_rank = micro_batch_size * dp
    # START is a multiple of INCREMENT (ScheduleConfig's rule), so checking INCREMENT covers every batch.
    if cfg.batch_granularity % per_rank:
        raise MoelibError(f"--rampup-batch-size INCREMENT {cfg.batch_granularity} must be a multiple of {per_rank} "
                          f"(micro-batch size {micro_batch_size} x data-parallel size {dp})")
    for batch in range(cfg.batch_start, cfg.batch_end + 1, cfg.batch_granularity):
        with_microbatches(par, batch, per_rank, "--rampup-batch-size")


if __name__ == "__main__":
    sys.exit(report.run_main(main, "v3_pretrain"))
