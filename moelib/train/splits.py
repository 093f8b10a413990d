"""Train / valid / test splits: Megatron's ``--split`` weights over documents, or separate corpora.

A split is over whole documents, never samples, so no document lends tokens to two parts (for the
default corpus a document is one source file). As in Megatron the parts are contiguous document
ranges in corpus order, so the same weights give the same parts on any number of ranks.
"""

from __future__ import annotations

import math

from moelib.errors import ConfigError, DataError
from moelib.train.data import PackedDataset
from moelib.train.indexed_dataset import IndexedDataset

PARTS = ("train", "valid", "test")
DEFAULT_SPLIT = "969,30,1"        # Megatron's default, for --data-path corpora
DEFAULT_CORPUS_SPLIT = "90,5,5"   # the embedded corpus has ~500 files: 1 % would leave the test part a file or two


def parse_split(text: str) -> tuple[float, float, float]:
    """The three weights of ``--split A,B,C`` (Megatron also writes A/B/C)."""
    try:
        weights = tuple(float(w) for w in text.replace("/", ",").split(","))
    except ValueError:
        weights = ()
    if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--split {text}: expected three non-negative weights for train,valid,test with a "
                          f"positive sum, e.g. 969,30,1")
    return weights


def split_documents(num_documents: int, weights: tuple[float, float, float]) -> list[range]:
    """Contiguous document ranges for train, valid and test, sized in proportion to ``weights``: each
    boundary is the cumulative share of the documents, rounded."""
    total, cumulative, bounds = sum(weights), 0.0, [0]
    for w in weights:
        cumulative += w
        bounds.append(round(cumulative / total * num_documents))
    bounds[-1] = num_documents
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def build_splits(data_prefix: str, seq_length: int, *, eod_id: int | None, vocab_size: int | None,
                 split: str | None, default_split: str, valid_path: str | None = None,
                 test_path: str | None = None, evaluating: bool = True) -> dict[str, PackedDataset | None]:
    """``{"train", "valid", "test"}`` -> PackedDataset, or None for a part with no data (weight 0).

    With ``valid_path`` or ``test_path`` the parts come from those corpora and all of ``data_prefix`` is
    training data; otherwise ``split`` (or ``default_split``) cuts ``data_prefix``'s documents. A part
    that evaluation needs but that holds too little for one sample is an error naming the flag.
    """
    pack = lambda data, docs=None: PackedDataset(data, seq_length, eod_id=eod_id, vocab_size=vocab_size,
                                                 documents=docs)
    if valid_path or test_path:
        if split is not None:
            raise ConfigError("--split cannot be combined with --valid-data-path or --test-data-path (those "
                              "corpora are the held-out parts; --data-path is then all training data)")
        out = {"train": pack(data_prefix)}
        for part, flag, path in (("valid", "--valid-data-path", valid_path), ("test", "--test-data-path", test_path)):
            if path and not IndexedDataset.exists(path):
                raise ConfigError(f"{flag} {path}: no indexed dataset there (expected {path}.bin and {path}.idx)")
            indexed = IndexedDataset(path) if path else None  # a corrupt file says so itself
            out[part] = _packed_or_error(lambda d=indexed: pack(d), f"{flag} {path}") if path else None
        if evaluating and out["valid"] is None:
            raise ConfigError("--valid-data-path is needed with --test-data-path while evaluation is on "
                              "(or set --eval-iters 0)")
        return out
    flag = f"--split {split or default_split}"
    weights = parse_split(split or default_split)
    indexed = IndexedDataset(data_prefix)
    ranges = split_documents(indexed.num_documents, weights)
    out = {}
    for part, weight, docs in zip(PARTS, weights, ranges):
        if part != "train" and (weight == 0 or not evaluating):
            out[part] = None
            if part == "valid" and evaluating:
                raise ConfigError(f"{flag} leaves the valid part empty while evaluation is requested (give it a "
                                  f"weight, or set --eval-iters 0)")
            continue
        out[part] = _packed_or_error(lambda d=docs: pack(indexed, d),
                                     f"{flag} gives the {part} part {len(docs)} of {indexed.num_documents} "
                                     f"documents")
    return out


def _packed_or_error(make, what: str) -> PackedDataset:
    """``make()``, whose only DataError, on an already opened IndexedDataset, is a part too small to pack."""
    try:
        return make()
    except DataError:
        raise ConfigError(f"{what}, too few tokens for one sample of seq_length + 1 tokens (raise its weight)") \
            from None
