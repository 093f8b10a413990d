"""The indexed dataset reads Megatron's exact bytes, round-trips, and names the file in every corruption."""

import os
import struct

import numpy as np
import pytest

from moelib.errors import DataError
from moelib.train.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

# code -> (numpy dtype, struct format char), from Megatron's DType enum.
CODES = {1: ("uint8", "B"), 2: ("int8", "b"), 3: ("int16", "h"), 4: ("int32", "i"), 5: ("int64", "q"),
         6: ("float64", "d"), 7: ("float32", "f"), 8: ("uint16", "H")}

# Documents as lists of sequences (sentences); the third document has two, the fourth is empty.
DOCS = [[[5, 6, 7]], [[1]], [[2, 3], [4, 5, 6, 7]], [], [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]]


def write_megatron_by_hand(prefix, docs, code):
    """The .bin/.idx pair exactly as Megatron's IndexedDatasetBuilder lays it out, with struct only."""
    char = CODES[code][1]
    size = struct.calcsize("<" + char)
    seqs = [s for doc in docs for s in doc]
    lengths = [len(s) for s in seqs]
    pointers = [sum(lengths[:i]) * size for i in range(len(seqs))]
    doc_idx = [0]
    for doc in docs:
        doc_idx.append(doc_idx[-1] + len(doc))
    with open(f"{prefix}.bin", "wb") as f:
        for s in seqs:
            f.write(struct.pack(f"<{len(s)}{char}", *s))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(seqs)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(struct.pack(f"<{len(lengths)}i", *lengths))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_idx)}q", *doc_idx))


@pytest.mark.parametrize("code", sorted(CODES))
def test_reads_megatron_byte_layout(tmp_path, code):
    prefix = tmp_path / "megatron_text_document"
    write_megatron_by_hand(prefix, DOCS, code)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(CODES[code][0])
    seqs = [s for doc in DOCS for s in doc]
    assert len(ds) == len(seqs) and ds.num_documents == len(DOCS)
    for i, s in enumerate(seqs):
        assert ds[i].tolist() == s
    for d, doc in enumerate(DOCS):
        assert ds.document(d).tolist() == [t for s in doc for t in s]
    assert ds.document_indices.tolist() == [0, 1, 2, 4, 4, 5]
    assert ds.num_tokens == sum(map(len, seqs))


@pytest.mark.parametrize("code", sorted(CODES))
def test_writer_emits_megatron_bytes(tmp_path, code):
    write_megatron_by_hand(tmp_path / "hand", DOCS, code)
    with IndexedDatasetBuilder(tmp_path / "ours", CODES[code][0]) as builder:
        for doc in DOCS:
            builder.add_document([t for s in doc for t in s], [len(s) for s in doc])
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"hand{ext}").read_bytes()


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32", "int64", "float32"])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 200, size=n).astype(dtype) for n in (0, 1, 17, 300, 5)]
    with IndexedDatasetBuilder(tmp_path / "rt", dtype) as builder:
        for doc in docs[:3]:
            builder.add_document(doc)
        for doc in docs[3:]:  # the add_item/end_document spelling, two items for one document
            builder.add_item(doc[:2])
            builder.add_item(doc[2:])
            builder.end_document()
    ds = IndexedDataset(tmp_path / "rt")
    assert ds.dtype == np.dtype(dtype) and ds.num_documents == len(docs) and len(ds) == 3 + 2 * 2
    for d, doc in enumerate(docs):
        np.testing.assert_array_equal(ds.document(d), doc)
    assert ds.num_tokens == sum(len(d) for d in docs)


def test_builder_is_atomic(tmp_path):
    prefix = tmp_path / "atomic"
    builder = IndexedDatasetBuilder(prefix, "uint16")
    builder.add_document([1, 2, 3])
    assert not IndexedDataset.exists(prefix)  # nothing under the real names until finalize
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(prefix, "uint16") as b:
        b.add_document([1, 2, 3])
        raise RuntimeError("crash mid-write")
    builder.abort()
    assert os.listdir(tmp_path) == []


def test_builder_rejects_ids_outside_dtype(tmp_path):
    with pytest.raises(DataError, match="do not fit"), IndexedDatasetBuilder(tmp_path / "x", "uint8") as b:
        b.add_document([1, 256])
    assert os.listdir(tmp_path) == []


def _corrupt(kind, prefix):
    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"
    raw = bytearray(open(idx, "rb").read())
    if kind == "missing .idx":
        os.remove(idx)
        return idx
    if kind == "missing .bin":
        os.remove(bin_)
        return bin_
    if kind == "short .bin":
        os.truncate(bin_, os.path.getsize(bin_) - 1)
        return bin_
    if kind == "long .bin":
        with open(bin_, "ab") as f:
            f.write(b"\x00\x00")
        return bin_
    if kind == "bad magic":
        raw[:9] = b"NOTMEGATR"
    elif kind == "wrong version":
        raw[9:17] = struct.pack("<Q", 2)
    elif kind == "unknown dtype":
        raw[17] = 9
    elif kind in ("narrowed dtype", "widened dtype"):  # int32 read as uint16, uint16 read as int32
        raw[17] = {4: 8, 8: 4}[raw[17]]
    elif kind == "moved pointer":
        n_seq = struct.unpack_from("<Q", raw, 18)[0]
        at = 34 + 4 * n_seq + 8 * 2
        raw[at:at + 8] = struct.pack("<q", struct.unpack_from("<q", raw, at)[0] + 2)
    elif kind == "truncated header":
        raw = raw[:20]
    elif kind == "truncated index":
        raw = raw[:-8]
    elif kind == "bad document indices":
        raw[-8:] = struct.pack("<q", 99)
    open(idx, "wb").write(bytes(raw))
    return idx


@pytest.mark.parametrize("kind", ["missing .idx", "missing .bin", "short .bin", "long .bin", "bad magic",
                                  "wrong version", "unknown dtype", "narrowed dtype", "widened dtype", "moved pointer",
                                  "truncated header", "truncated index", "bad document indices"])
def test_corrupt_files_raise_data_error_naming_the_file(tmp_path, kind):
    prefix = tmp_path / "c_text_document"
    write_megatron_by_hand(prefix, DOCS, 4 if kind == "narrowed dtype" else 8)
    path = _corrupt(kind, prefix)
    with pytest.raises(DataError) as err:
        IndexedDataset(prefix)
    message = str(err.value)
    assert path in message
    assert "\n" not in message and message.endswith(".")
