"""Megatron-LM's indexed dataset: a ``.bin`` of raw token ids and an ``.idx`` describing it.

Reading and writing the same bytes as Megatron's ``preprocess_data.py`` means corpora tokenised for
Megatron work here unchanged. The ``.idx`` layout (all little-endian):

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    <Q        version, always 1
    <B        dtype code of the tokens in the .bin (see DTYPE_CODES)
    <Q        sequence count S
    <Q        document-index count D (documents + 1: the array starts with 0)
    S x int32 sequence lengths, in tokens
    S x int64 sequence pointers, byte offsets into the .bin
    D x int64 document indices: document d is sequences [idx[d], idx[d+1])

Megatron's multimodal variant appends S int8 "modes"; trailing bytes are tolerated and ignored.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from moelib.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count

# Megatron's DType enum (megatron/core/datasets/indexed_dataset.py).
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype Megatron's preprocess_data picks for a vocabulary: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str | os.PathLike) -> str:
    return os.fspath(prefix) + ".bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return os.fspath(prefix) + ".idx"


def _map(path: str, dtype: np.dtype) -> np.ndarray:
    """A read-only memory map of a whole file; numpy refuses to map an empty file, so fake that one."""
    count = os.path.getsize(path) // dtype.itemsize
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class IndexedDataset:
    """Memory-mapped reader. ``ds[i]`` is sequence i; ``ds.document(d)`` all tokens of document d."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        self.idx_path, self.bin_path = idx_path(prefix), bin_path(prefix)
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise DataError(f"Indexed dataset file {path} does not exist (a dataset is a .bin and .idx pair "
                                f"sharing the prefix {self.prefix}).")
        self._read_index()
        self._tokens = _map(self.bin_path, self.dtype)
        self._validate_pointers()

    def _read_index(self) -> None:
        path = self.idx_path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
        if head[:len(MAGIC)] != MAGIC:
            raise DataError(f"{path} is not a Megatron indexed dataset index: it should start with {MAGIC!r}, "
                            f"found {head[:len(MAGIC)]!r}.")
        if len(head) < _HEADER.size:
            raise DataError(f"{path} is truncated: its header needs {_HEADER.size} bytes, the file has {size}.")
        _, version, code, n_seq, n_doc = _HEADER.unpack(head)
        if version != VERSION:
            raise DataError(f"{path} has index format version {version}; only version {VERSION} is supported.")
        if code not in DTYPE_CODES:
            raise DataError(f"{path} has unknown token dtype code {code} (expected one of "
                            f"{', '.join(f'{c}={d.name}' for c, d in DTYPE_CODES.items())}).")
        expected = _HEADER.size + 12 * n_seq + 8 * n_doc  # int32 lengths + int64 pointers + int64 doc indices
        if size < expected:
            raise DataError(f"{path} is truncated: its header announces {n_seq} sequences and {n_doc} document "
                            f"indices ({expected} bytes), the file has {size} bytes.")
        self.dtype = DTYPE_CODES[code]
        raw = _map(path, np.dtype(np.uint8))
        o = _HEADER.size
        self.sequence_lengths = raw[o:o + 4 * n_seq].view(np.int32)
        o += 4 * n_seq
        self.sequence_pointers = raw[o:o + 8 * n_seq].view(np.int64)
        o += 8 * n_seq
        self.document_indices = raw[o:o + 8 * n_doc].view(np.int64)
        docs = self.document_indices
        if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) < 0):
            raise DataError(f"{path} has inconsistent document indices: they must rise from 0 to the sequence "
                            f"count {n_seq}.")
        if np.any(self.sequence_lengths < 0):
            raise DataError(f"{path} has a negative sequence length.")

    def _validate_pointers(self) -> None:
        """Writers (Megatron's and ours) lay sequences end to end, so pointer i+1 = pointer i + length i x item
        size and the .bin holds exactly sum(lengths) x item size bytes. A dtype code changed after writing
        (int32 -> uint16) breaks both, where bounds checks alone would read every token wrongly."""
        itemsize = self.dtype.itemsize
        ptr, lengths = self.sequence_pointers, self.sequence_lengths
        expected = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * itemsize)]) if len(ptr) else ptr
        wrong = np.flatnonzero(ptr != expected)
        if len(wrong):
            i = int(wrong[0])
            raise DataError(f"{self.idx_path} has inconsistent sequence pointers: sequence {i} starts at byte "
                            f"{int(ptr[i])}, but the lengths before it, in the dtype code's {self.dtype.name} tokens, "
                            f"put it at byte {int(expected[i])}.")
        needed = int(lengths.sum(dtype=np.int64)) * itemsize
        have = os.path.getsize(self.bin_path)
        if have < needed:
            raise DataError(f"{self.bin_path} is shorter than its index says: it has {have} bytes, "
                            f"{self.idx_path} describes {needed}.")
        if have > needed:
            raise DataError(f"{self.bin_path} holds {have} bytes, but {self.idx_path} describes {needed} "
                            f"({lengths.sum(dtype=np.int64)} {self.dtype.name} tokens): the dtype code or the "
                            f"files do not match.")
        self.token_offsets = ptr // itemsize  # pointers in tokens, for slicing the token map

    # -- access ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences in {self.prefix}")
        start = int(self.token_offsets[i])
        return self._tokens[start:start + int(self.sequence_lengths[i])]

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def tokens(self) -> np.ndarray:
        """The whole .bin as one token array (what the pointers index into, divided by the item size)."""
        return self._tokens

    def document(self, d: int) -> np.ndarray:
        lo, hi = int(self.document_indices[d]), int(self.document_indices[d + 1])
        parts = [self[i] for i in range(lo, hi)]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    @staticmethod
    def exists(prefix: str | os.PathLike) -> bool:
        return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


class IndexedDatasetBuilder:
    """Writes ``{prefix}.bin`` and ``{prefix}.idx`` in Megatron's layout.

    Both files are written under temporary names and renamed into place by ``finalize()``, so a crash
    never leaves a half-written dataset under the real names. Use as a context manager to finalize on
    success and clean up on an exception.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.uint16):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise DataError(f"Indexed dataset {os.fspath(prefix)}: token dtype {self.dtype.name} is not one Megatron "
                            f"can store ({', '.join(d.name for d in DTYPE_CODES.values())}).")
        self.prefix = os.fspath(prefix)
        suffix = f".tmp-{os.getpid()}-{id(self):x}"
        self._bin_tmp, self._idx_tmp = bin_path(prefix) + suffix, idx_path(prefix) + suffix
        try:
            self._bin = open(self._bin_tmp, "wb")
        except OSError as e:
            raise DataError(f"Cannot write indexed dataset {bin_path(prefix)}: {e.strerror}.") from None
        self._lengths: list[int] = []
        self._doc_indices = [0]
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None

    def add_item(self, tokens) -> None:
        """Append one sequence to the current document (close it with ``end_document``)."""
        arr = np.asarray(tokens)
        if self._info is not None and arr.size and (arr.min() < self._info.min or arr.max() > self._info.max):
            raise DataError(f"Indexed dataset {self.prefix}: token ids {arr.min()}..{arr.max()} do not fit "
                            f"the file's dtype {self.dtype.name}.")
        self._bin.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self._lengths.append(int(arr.size))

    def end_document(self) -> None:
        self._doc_indices.append(len(self._lengths))

    def add_document(self, tokens, lengths: list[int] | None = None) -> None:
        """Append a document: one sequence, or several when ``lengths`` splits it (e.g. into sentences)."""
        arr = np.asarray(tokens).reshape(-1)
        bounds = np.cumsum([0, *(lengths if lengths is not None else [arr.size])])
        if bounds[-1] != arr.size:
            raise DataError(f"Indexed dataset {self.prefix}: sequence lengths sum to {bounds[-1]} but the "
                            f"document has {arr.size} tokens.")
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            self.add_item(arr[lo:hi])
        self.end_document()

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        docs = np.asarray(self._doc_indices, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], len(lengths), len(docs)))
            for array in (lengths, pointers, docs):
                f.write(array.tobytes())
        # Each rename is atomic, the pair is not: a reader racing a rewrite of the same prefix can see a
        # new .bin with the old .idx; the reader's bounds checks catch the harmful case (a short .bin).
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))

    def abort(self) -> None:
        """Drop everything written so far; the real file names are never touched."""
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            Path(path).unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
