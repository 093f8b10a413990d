#!/usr/bin/env python3
"""Tokenise JSONL or plain-text files into Megatron-LM's indexed dataset format (.bin/.idx).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my \\
        --tokenizer tokenizer.json --append-eod

writes data/my_text_document.bin and .idx (one pair per --json-keys key), readable by moelib and by
Megatron-LM. Files ending in .json or .jsonl are JSON lines, one document per line with its text under
each key; any other file is one plain-text (UTF-8) document, stored under the first key.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from moelib.errors import DataError
from moelib.parallel.report import run_main
from moelib.train.indexed_dataset import IndexedDatasetBuilder, token_dtype
from moelib.train.tokenizer import Tokenizer

CHUNK = 64  # documents per task sent to a worker: big enough to amortise the pickling


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL (.json/.jsonl) or plain-text files")
    p.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer.json")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding the text (default: text)")
    p.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    p.add_argument("--eod-token", default=None, help="the EOD token (default: found in the vocabulary)")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    return args


def read_documents(paths: list[str], keys: list[str]) -> Iterator[tuple[dict[str, str], int]]:
    """Yield ({key: text}, bytes read) per document, naming file and line in every error."""
    for path in paths:
        if path.endswith((".json", ".jsonl")):
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError:
                        raise DataError(f"{path}:{lineno} is not a valid JSON line.") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{path}:{lineno} is a JSON {type(record).__name__}, expected an object.")
                    for key in keys:
                        if not isinstance(record.get(key), str):
                            what = "has no key" if key not in record else "has a non-string value under"
                            raise DataError(f"{path}:{lineno} {what} {key!r} (choose keys with --json-keys).")
                    yield {key: record[key] for key in keys}, len(line)
        else:
            with open(path, "rb") as f:
                raw = f.read()
            try:
                yield {keys[0]: raw.decode("utf-8")}, len(raw)
            except UnicodeDecodeError:
                raise DataError(f"{path} is not UTF-8 text.") from None


def chunked(docs: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_tokenizer: Tokenizer | None = None  # one per worker process, loaded by _init


def _init(path: str, eod_token: str | None, require_eod: bool) -> None:
    global _tokenizer
    _tokenizer = Tokenizer.from_file(path, eod_token, require_eod)


def _encode(chunk: list) -> list[tuple[dict[str, np.ndarray], int]]:
    keys = list(chunk[0][0])
    ids = {key: _tokenizer.encode_batch([texts[key] for texts, _ in chunk]) for key in keys}
    # Arrays, not lists: they travel back from the worker processes far cheaper.
    return [({key: np.asarray(ids[key][i], np.int64) for key in keys}, nbytes) for i, (_, nbytes) in enumerate(chunk)]


def run(args: argparse.Namespace) -> dict[str, int]:
    for path in args.input:
        if not os.path.isfile(path):
            raise DataError(f"Input file {path} does not exist.")
    tok = Tokenizer.from_file(args.tokenizer, args.eod_token, require_eod=args.append_eod)
    keys = args.json_keys if any(p.endswith((".json", ".jsonl")) for p in args.input) else args.json_keys[:1]
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    stats = {"records": 0, "documents": 0, "tokens": 0, "skipped_empty": 0}
    chunks = chunked(read_documents(args.input, keys), CHUNK)
    init = (args.tokenizer, args.eod_token, args.append_eod)
    with contextlib.ExitStack() as stack:
        builders = {key: stack.enter_context(IndexedDatasetBuilder(f"{args.output_prefix}_{key}_document",
                                                                   token_dtype(tok.vocab_size)))
                    for key in keys}
        if args.workers > 1:
            pool = stack.enter_context(multiprocessing.Pool(args.workers, _init, init))
            encoded = pool.imap(_encode, chunks)
        else:
            _init(*init)
            encoded = map(_encode, chunks)
        total = sum(os.path.getsize(p) for p in args.input)
        bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, desc="tokenising", disable=None))
        for chunk in encoded:
            for ids, nbytes in chunk:
                for key, doc in ids.items():
                    if not len(doc):  # Megatron would store an empty document; it only wastes an index entry
                        stats["skipped_empty"] += 1
                        continue
                    if args.append_eod:
                        doc = np.append(doc, tok.eod)
                    builders[key].add_document(doc)
                    stats["documents"] += 1
                    stats["tokens"] += len(doc)
                stats["records"] += 1
                bar.update(nbytes)
            bar.set_postfix(docs=stats["records"])
    for key in keys:
        print(f"wrote {args.output_prefix}_{key}_document.bin/.idx")
    print(f"{stats['records']} records read, {stats['documents']} documents and {stats['tokens']} tokens written, "
          f"{stats['skipped_empty']} empty texts skipped")
    return stats


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "preprocess_data"))
