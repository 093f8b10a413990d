"""Pretraining data: packing documents into samples, a resumable shuffled batch loader, the default corpus.

Packing follows DeepSeek-V3: documents are concatenated into one token stream with an end-of-document
token after each, and the stream is cut into samples of ``seq_length + 1`` tokens with no
cross-document attention mask, so a sample may span documents. Sample k is stream tokens
``[k*T, k*T + T + 1)``: consecutive samples share one token, so every stream token is an input exactly
once and a label exactly once per epoch (as in Megatron's GPTDataset).

The loader's whole position is the number of samples consumed globally. Which samples come next
follows from it and the seed alone, so a checkpoint stores four ints and resumes exactly, under any
data-parallel size.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moelib.errors import ConfigError, DataError
from moelib.train.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, token_dtype
from moelib.train.tokenizer import Tokenizer, train_bpe

try:
    import fcntl
except ImportError:  # Windows: builds still land atomically, concurrent ones just duplicate work
    fcntl = None


class PackedDataset:
    """Fixed-length samples of ``seq_length + 1`` tokens cut from an indexed dataset's documents.

    ``eod_id``: the end-of-document token put after each non-empty document that does not already end
    with it (corpora preprocessed with ``--append-eod`` already do). None: plain concatenation.
    ``vocab_size``: when given, each sample is checked to hold only ids below it.
    ``documents``: pack only this range of document indices (a train / valid / test split); None: all.
    """

    def __init__(self, data: str | os.PathLike | IndexedDataset, seq_length: int, eod_id: int | None = None,
                 vocab_size: int | None = None, documents: range | None = None):
        if not isinstance(seq_length, int) or seq_length < 1:
            raise ConfigError(f"seq_length: must be a positive integer, got {seq_length!r}")
        self.indexed = data if isinstance(data, IndexedDataset) else IndexedDataset(data)
        self.seq_length, self.eod_id, self.vocab_size = seq_length, eod_id, vocab_size
        ds = self.indexed
        self.documents = range(ds.num_documents) if documents is None else documents
        # Documents are whole runs of sequences, so a document range is a sequence range.
        first, end = int(ds.document_indices[self.documents.start]), int(ds.document_indices[self.documents.stop])
        lengths = ds.sequence_lengths.astype(np.int64)
        eod_after = self._missing_eods(lengths) if eod_id is not None else np.zeros(len(lengths), bool)
        lengths, eod_after, offsets = lengths[first:end], eod_after[first:end], ds.token_offsets[first:end]
        packed_offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        if not eod_after.any() and np.array_equal(offsets - (offsets[0] if len(offsets) else 0), packed_offsets):
            # The common case (Megatron's writer, --append-eod): the .bin already is the stream.
            start = int(offsets[0]) if len(offsets) else 0
            self._flat = ds.tokens[start:start + int(lengths.sum())]
            self.num_tokens = len(self._flat)
        else:
            self._flat = None
            self._lengths, self._offsets, self._eod_after = lengths, offsets, eod_after
            piece = lengths + eod_after
            self._starts = np.concatenate([[0], np.cumsum(piece)[:-1]]) if len(piece) else piece
            self.num_tokens = int(piece.sum())
        self.num_samples = (self.num_tokens - 1) // seq_length
        if self.num_samples < 1:
            raise DataError(f"Corpus {ds.bin_path} holds {self.num_tokens} tokens (end-of-document tokens "
                            f"included), too few for one sample of seq_length + 1 = {seq_length + 1} tokens.")

    def _missing_eods(self, lengths: np.ndarray) -> np.ndarray:
        """For each sequence: does an EOD have to follow it (it ends a non-empty document lacking one)?"""
        ds, flags = self.indexed, np.zeros(len(lengths), bool)
        nonempty = np.flatnonzero(lengths > 0)
        docs = ds.document_indices
        # The last non-empty sequence before each document's end, if it lies inside that document.
        k = np.searchsorted(nonempty, docs[1:], side="left") - 1
        has = k >= 0
        has[has] = nonempty[k[has]] >= docs[:-1][has]
        last = nonempty[k[has]]
        last_tokens = ds.tokens[ds.token_offsets[last] + lengths[last] - 1]
        flags[last[last_tokens != self.eod_id]] = True
        return flags

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, k: int) -> np.ndarray:
        """Sample k (unshuffled) as int64 tokens, ``seq_length + 1`` of them."""
        if not 0 <= k < self.num_samples:
            raise IndexError(f"sample {k} out of range for {self.num_samples} samples")
        need, start = self.seq_length + 1, k * self.seq_length
        if self._flat is not None:
            out = np.asarray(self._flat[start:start + need], dtype=np.int64)
        else:
            out = np.empty(need, np.int64)
            i = int(np.searchsorted(self._starts, start, side="right")) - 1
            pos, filled = start - int(self._starts[i]), 0
            while filled < need:
                n, off = int(self._lengths[i]), int(self._offsets[i])
                if pos < n:
                    take = min(n - pos, need - filled)
                    out[filled:filled + take] = self.indexed.tokens[off + pos:off + pos + take]
                    filled, pos = filled + take, pos + take
                if filled < need and pos == n and self._eod_after[i]:
                    out[filled] = self.eod_id
                    filled += 1
                i, pos = i + 1, 0
        if self.vocab_size is not None and (out.min() < 0 or out.max() >= self.vocab_size):
            bad = int(out[(out < 0) | (out >= self.vocab_size)][0])
            raise DataError(f"Corpus {self.indexed.bin_path} holds token id {bad} (sample {k}), outside the "
                            f"vocabulary of {self.vocab_size} ids.")
        return out


class BatchLoader:
    """Shuffled global batches of a PackedDataset; each data-parallel rank gets its contiguous slice.

    Epoch e visits every sample once, in a permutation drawn from ``numpy.random.default_rng([seed, e])``.
    Global sample position g (counting from the start of training) is sample ``perm_{g // n}[g % n]``.
    Rank r of w takes positions ``[c + r*G/w, c + (r+1)*G/w)`` of a global batch starting at c.
    """

    def __init__(self, dataset: PackedDataset, global_batch_size: int, *, seed: int = 1234, dp_rank: int = 0,
                 dp_size: int = 1, consumed_samples: int = 0):
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank: must lie in [0, dp_size={dp_size}), got {dp_rank}")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")
        self.dataset, self.seed, self.dp_rank, self.dp_size = dataset, seed, dp_rank, dp_size
        self.global_batch_size = global_batch_size
        self.consumed_samples = consumed_samples
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        return self.consumed_samples // len(self.dataset)

    def _sample_id(self, position: int) -> int:
        epoch, i = divmod(position, len(self.dataset))
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs' worth of permutations at a time
                del self._perms[min(self._perms)]
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return int(self._perms[epoch][i])

    def next_batch(self, global_batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(tokens, labels)``, int64 ``[G / dp_size, seq_length]``; advances by G samples.

        ``global_batch_size`` overrides the default for this step (batch-size ramp).
        """
        size = self.global_batch_size if global_batch_size is None else global_batch_size
        if not isinstance(size, int) or size < 1 or size % self.dp_size:
            raise ConfigError(f"global_batch_size: must be a positive multiple of the data-parallel size "
                              f"{self.dp_size}, got {size!r}")
        per_rank = size // self.dp_size
        first = self.consumed_samples + self.dp_rank * per_rank
        rows = torch.from_numpy(np.stack([self.dataset[self._sample_id(g)] for g in range(first, first + per_rank)]))
        self.consumed_samples += size
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "num_samples": len(self.dataset), "seq_length": self.dataset.seq_length}

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in mine):
            raise DataError(f"The saved data position {state!r} is not a loader state (expected the ints "
                            f"{', '.join(mine)}).")
        for key in ("seed", "num_samples", "seq_length"):
            if state[key] != mine[key]:
                raise DataError(f"The saved data position belongs to a different data stream: it was saved with "
                                f"{key}={state[key]}, corpus {self.dataset.indexed.bin_path} now gives {mine[key]}.")
        self.consumed_samples = int(state["consumed_samples"])


# -- the default corpus ---------------------------------------------------------------------------

FORMAT_VERSION = 1  # bump when anything below changes what gets built
DEFAULT_VOCAB_SIZE = 4096  # the tiny preset's vocabulary
DEFAULT_MAX_BYTES = 16 * 2**20  # all of CPython 3.11's non-test stdlib (~9 MB) fits; builds in seconds
CORPUS_NAME = "stdlib_text_document"
# Test suites and IDLE would dominate the text; encodings/ is generated codec tables.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo",
                        "encodings", "__pycache__"})


def cache_root() -> Path:
    return Path(os.environ.get("MOELIB_CACHE") or Path.home() / ".cache" / "moelib")


def stdlib_sources(max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Path, list[Path]]:
    """The running interpreter's stdlib ``*.py`` files in sorted order, stopping once ``max_bytes`` is reached."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        found += [Path(here, f) for f in files if f.endswith(".py")]
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    chosen, total = [], 0
    for path in found:
        if total >= max_bytes:
            break
        chosen.append(path)
        total += path.stat().st_size
    return root, chosen


def stdlib_documents(max_bytes: int = DEFAULT_MAX_BYTES) -> list[str]:
    """The default corpus's documents in order, as stdlib-relative paths: the source files with any text
    (empty files give no document). Document d of the corpus is file d of this list."""
    root, files = stdlib_sources(max_bytes)
    return [p.relative_to(root).as_posix() for p in files if p.read_text(encoding="utf-8", errors="replace")]


def default_corpus(vocab_size: int = DEFAULT_VOCAB_SIZE, *, max_bytes: int = DEFAULT_MAX_BYTES,
                   cache_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """``(data_prefix, tokenizer_path)`` of the default corpus, building and caching it on first use.

    Built from this interpreter's standard-library sources with a byte-level BPE trained here; nothing is
    downloaded. The cache entry is keyed by Python version, vocabulary size, cap and format version, and
    appears only by an atomic rename of a finished directory, so a crash or a concurrent build never
    leaves a half-built corpus behind.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    key = _cache_key(vocab_size, max_bytes)
    final = root / key
    if not final.is_dir():
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"Cannot create the corpus cache directory {root} ({e.strerror}); "
                            f"set MOELIB_CACHE to a writable directory.") from None
        with _exclusive(root / f".{key}.lock"):
            if not final.is_dir():  # another process may have finished it while we waited
                _build(root, key, vocab_size, max_bytes)
    return str(final / CORPUS_NAME), str(final / "tokenizer.json")


def default_dataset(vocab_size: int, seq_length: int, **corpus_kwargs) -> PackedDataset:
    """The default corpus packed into ``seq_length`` sequences, documents split at its tokenizer's EOD."""
    prefix, tokenizer = default_corpus(vocab_size, **corpus_kwargs)
    return PackedDataset(prefix, seq_length, eod_id=Tokenizer.from_file(tokenizer).eod, vocab_size=vocab_size)


def _cache_key(vocab_size: int, max_bytes: int) -> str:
    v = sys.version_info
    return f"stdlib-{sys.implementation.name}{v.major}.{v.minor}.{v.micro}-vocab{vocab_size}-cap{max_bytes}" \
           f"-format{FORMAT_VERSION}"


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Serialise builders (ranks of one job start together); the OS drops the lock if a holder dies."""
    if fcntl is None:
        yield False
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(root: Path, key: str, vocab_size: int, max_bytes: int) -> None:
    if fcntl is not None:  # we hold the lock, so any temp dir of this key is a crashed build's leftover
        for stale in root.glob(f".{key}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        t0 = time.perf_counter()
        stdlib, files = stdlib_sources(max_bytes)
        if not files:
            raise DataError(f"Found no standard-library sources under {stdlib} to build the default corpus from.")
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        tok = train_bpe(texts, vocab_size, save_path=tmp / "tokenizer.json")
        n_tokens = n_docs = 0
        with IndexedDatasetBuilder(tmp / CORPUS_NAME, token_dtype(vocab_size)) as builder:
            for ids in tok.encode_batch(texts):
                if ids:  # empty __init__.py files: skipped, as preprocess_data does
                    builder.add_document(ids + [tok.eod])  # EOD appended, as preprocess_data --append-eod
                    n_tokens, n_docs = n_tokens + len(ids) + 1, n_docs + 1
        meta = {"python": sys.version, "stdlib": str(stdlib), "files": len(files), "documents": n_docs,
                "bytes": sum(len(t.encode("utf-8")) for t in texts), "tokens": n_tokens,
                "vocab_size": vocab_size, "format": FORMAT_VERSION,
                "build_seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.rename(tmp, root / key)
        except OSError:
            if not (root / key).is_dir():
                raise
            # Lost the race to a builder without the lock (no fcntl): its result is identical; use it.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
