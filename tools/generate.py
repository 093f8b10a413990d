"""Generate text from a moelib checkpoint or a Hugging Face DeepSeek-V3 directory.

    python tools/generate.py --load checkpoints/v3_pretrain --prompt "def main(" --max-new-tokens 64
    python tools/generate.py --load hf/tiny --prompt-file prompt.txt --temperature 0.8 --top-p 0.95 --seed 1
    python tools/generate.py --load CKPT --interactive --speculative mtp --dtype bf16
    python tools/generate.py --load CKPT --prompt-file p.txt --dtype bf16 --compile     # compiled decode step

    mpirun -n 4 python tools/generate.py --load CKPT --prompt "import os"   # experts sharded over 4 ranks

Under mpirun (or torchrun) the routed experts are sharded over the ranks as in training; every rank runs
the same request and rank 0 prints. The tokenizer is --tokenizer, else the checkpoint's tokenizer.json,
else the default corpus's (the one `make pretrain` trains on). Text is streamed as it is generated; the
last line gives tokens/s, the MTP acceptance rate and the KV cache's bytes per token.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelib.errors import ConfigError, DataError, MoelibError  # noqa: E402
from moelib.inference.generate import generate  # noqa: E402
from moelib.inference.load import DTYPES, cast_weights, check_dtype, load_model  # noqa: E402
from moelib.inference.sampling import Sampler  # noqa: E402
from moelib.parallel.launch import started_by_mpi  # noqa: E402
from moelib.parallel.report import run_main  # noqa: E402
from moelib.train.checkpoint import resolve  # noqa: E402
from moelib.train.tokenizer import Tokenizer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="a moelib checkpoint (step directory or root) or an HF directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="a UTF-8 file holding the prompt")
    src.add_argument("--interactive", action="store_true", help="read one prompt per line from stdin until EOF")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 (default) keeps every token")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--speculative", choices=["mtp"], default=None, help="MTP self-speculative decoding")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="resident weights (fp8: E4M3, 128x128 blocks)")
    p.add_argument("--compile", action="store_true",
                   help="decode steps compiled by torch.compile (static shapes; the first prompt pays the compile)")
    p.add_argument("--tokenizer", help="a tokenizer.json (default: the checkpoint's, else the default corpus's)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: decoding is small GEMMs, which threads on busy cores slow)")
    return p.parse_args(argv)


def find_tokenizer(args: argparse.Namespace, vocab_size: int) -> Tokenizer:
    if args.tokenizer:
        return Tokenizer.from_file(args.tokenizer, require_eod=False)
    dirs = [Path(args.load)]
    try:
        dirs.append(resolve(args.load))
    except MoelibError:
        pass  # an HF directory
    for d in dirs:
        if (d / "tokenizer.json").is_file():
            return Tokenizer.from_file(d / "tokenizer.json", require_eod=False)
    from moelib.train.data import default_corpus

    return Tokenizer.from_file(default_corpus(vocab_size)[1], require_eod=False)


def read_prompts(args: argparse.Namespace):
    if args.prompt is not None:
        yield args.prompt
    elif args.prompt_file is not None:
        try:
            yield Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"--prompt-file {args.prompt_file} is unreadable ({e.__class__.__name__}).") from None
    else:
        for line in sys.stdin:
            yield line.rstrip("\n")


def run_one(model, tok: Tokenizer, text: str, args: argparse.Namespace, sampler: Sampler, show: bool) -> None:
    ids = tok.encode(text)
    if not ids:
        raise DataError("--prompt is empty (it encodes to no tokens); give some text")
    new: list[int] = []
    shown = ""

    def stream(tokens: torch.Tensor) -> None:
        nonlocal shown
        new.extend(tokens[0].tolist())
        text = tok.decode(new)
        if show and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text

    out = generate(model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_token_id=tok.eod, speculative=args.speculative, stream=stream,
                   sampler=sampler, compile=args.compile)
    if not show:
        return
    print(tok.decode(new)[len(shown):], end="")  # whatever a cut-off character held back
    s = out.stats
    accept = f"{s['acceptance_rate']:.2f} ({s['accepted']}/{s['drafted']})" if s["drafted"] else "n/a"
    print(f"\n[{len(new)} tokens, {s['tokens_per_s']:.1f} tokens/s, MTP acceptance {accept}, "
          f"KV cache {s['kv_bytes_per_token']} bytes/token]", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    check_dtype(args.dtype)
    sampler, show = Sampler(args.seed), True
    if not (started_by_mpi() or "WORLD_SIZE" in os.environ):
        model = load_model(args.load, args.dtype)  # each block cast as it is read
    else:
        model = load_model(args.load)  # fp32, sharded over the ranks, then cast
        if args.interactive:
            raise ConfigError("--interactive reads stdin, which only rank 0 has; use --prompt or --prompt-file "
                              "under mpirun")
        from moelib.inference.expert_parallel import SyncedSampler, expert_parallel

        show = expert_parallel(model).is_main
        sampler = SyncedSampler(args.seed)
        model = cast_weights(model, args.dtype)
    tok = find_tokenizer(args, model.cfg.vocab_size)
    for text in read_prompts(args):
        try:
            run_one(model, tok, text, args, sampler, show)
        except MoelibError as err:
            if not args.interactive:
                raise
            print(f"generate: error: {err}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "generate"))
