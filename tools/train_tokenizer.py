#!/usr/bin/env python3
"""Train a byte-level BPE tokenizer (GPT-2 style) on JSONL or plain-text files and write its tokenizer.json.

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 32000 --output data/tokenizer.json
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my --tokenizer data/tokenizer.json \\
        --append-eod
    python recipes/v3_pretrain.py --data-path data/my_text_document --tokenizer data/tokenizer.json

Inputs are read as preprocess_data.py reads them: files ending in .json or .jsonl are JSON lines with the text
under each --json-keys key, any other file is one UTF-8 document. The first special token is the end-of-document
token. An output named tokenizer.json gets tokenizer_config.json and special_tokens_map.json beside it, so
transformers' AutoTokenizer loads its directory. Training is deterministic for the same input.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocess_data import read_documents  # noqa: E402

from moelib.errors import DataError  # noqa: E402
from moelib.parallel.report import run_main  # noqa: E402
from moelib.train.tokenizer import EOD_TOKEN, train_bpe, write_hf_tokenizer  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL (.json/.jsonl) or plain-text files")
    p.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, special tokens included")
    p.add_argument("--output", required=True, help="the tokenizer.json to write")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding the text (default: text)")
    p.add_argument("--special-tokens", nargs="+", default=[EOD_TOKEN],
                   help=f"special tokens, the end-of-document token first (default: {EOD_TOKEN})")
    p.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen this often (default 2)")
    return p.parse_args(argv)


def texts(paths: list[str], keys: list[str]) -> Iterator[str]:
    for doc, _ in read_documents(paths, keys):
        yield from doc.values()


def run(args: argparse.Namespace) -> None:
    for path in args.input:
        if not os.path.isfile(path):
            raise DataError(f"Input file {path} does not exist.")
    if args.min_frequency < 1:
        raise DataError(f"--min-frequency must be at least 1, got {args.min_frequency}.")
    out = Path(args.output)
    if out.is_dir():
        raise DataError(f"--output {out} is a directory; name the tokenizer.json file to write.")
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = args.json_keys if any(p.endswith((".json", ".jsonl")) for p in args.input) else args.json_keys[:1]
    tok = train_bpe(texts(args.input, keys), args.vocab_size, special_tokens=args.special_tokens,
                    min_frequency=args.min_frequency, save_path=out)
    if out.name == "tokenizer.json":  # the transformers files are named for a directory holding tokenizer.json
        write_hf_tokenizer(out, out.parent)
    print(f"wrote {out}: {tok.vocab_size} tokens, end-of-document token {tok.eod_token!r} (id {tok.eod})")


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "train_tokenizer"))
