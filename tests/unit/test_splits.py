"""Train / valid / test splits: Megatron's --split weights over documents, separate held-out corpora."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.errors import ConfigError
from moelib.train.data import PackedDataset, default_corpus, stdlib_documents
from moelib.train.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from moelib.train.splits import DEFAULT_CORPUS_SPLIT, build_splits, parse_split, split_documents

EOD, T = 0, 8


def write(prefix, docs):
    with IndexedDatasetBuilder(prefix, "uint16") as b:
        for doc in docs:
            b.add_document(doc)
    return str(prefix)


def random_docs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 1000, size=rng.integers(5, 40)).tolist() for _ in range(n)]


@pytest.mark.parametrize("text", ["969,30", "1,2,3,4", "a,b,c", "0,0,0", "-1,2,3", "nan,1,1", "inf,1,1", ""])
def test_bad_split_weights_name_the_flag(text):
    with pytest.raises(ConfigError, match=r"^--split .*three non-negative weights"):
        parse_split(text)


def test_megatron_slash_form_is_accepted():
    assert parse_split("969/30/1") == parse_split("969,30,1") == (969.0, 30.0, 1.0)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5000), st.tuples(*[st.integers(0, 1000)] * 3).filter(lambda w: sum(w) > 0))
def test_split_ranges_partition_the_documents_in_proportion(n, weights):
    parts = split_documents(n, tuple(map(float, weights)))
    assert parts[0].start == 0 and parts[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))  # contiguous, disjoint, covering
    for part, w in zip(parts, weights):
        assert abs(len(part) - n * w / sum(weights)) <= 1.0  # each boundary is rounded once
        if w == 0:
            assert len(part) == 0


def test_a_document_range_packs_as_a_corpus_of_only_those_documents(tmp_path):
    docs = random_docs()
    full = IndexedDataset(write(tmp_path / "all", docs))
    for a, b in [(0, 20), (20, 57), (57, 60)]:
        alone = PackedDataset(write(tmp_path / f"part{a}", docs[a:b]), T, eod_id=EOD)
        part = PackedDataset(full, T, eod_id=EOD, documents=range(a, b))
        assert len(part) == len(alone) and part.num_tokens == alone.num_tokens
        assert all(np.array_equal(part[k], alone[k]) for k in range(len(part)))


def test_split_parts_share_no_document_tokens(tmp_path):
    # Each document is one distinct token repeated: a sample's tokens tell which documents it came from.
    docs = [[d + 1] * (5 + d % 7) for d in range(50)]
    parts = build_splits(write(tmp_path / "c", docs), T, eod_id=EOD, vocab_size=None, split="80,10,10",
                         default_split="1,1,1")
    seen = [{int(t) for k in range(len(ds)) for t in ds[k]} - {EOD} for ds in parts.values()]
    assert all(seen) and not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_empty_or_too_small_parts_are_refused_only_when_evaluation_needs_them(tmp_path):
    prefix = write(tmp_path / "c", random_docs())
    kw = dict(eod_id=EOD, vocab_size=None, default_split="1,1,1")
    with pytest.raises(ConfigError, match=r"^--split 100,0,0 leaves the valid part empty"):
        build_splits(prefix, T, split="100,0,0", **kw)
    with pytest.raises(ConfigError, match=r"^--split 1000,1,0 gives the valid part 0 of 60 documents"):
        build_splits(prefix, T, split="1000,1,0", **kw)
    with pytest.raises(ConfigError, match=r"^--split 0,1,1 gives the train part 0"):
        build_splits(prefix, T, split="0,1,1", **kw)
    parts = build_splits(prefix, T, split="100,0,0", evaluating=False, **kw)
    assert parts["valid"] is None and parts["test"] is None and len(parts["train"]) > 0
    parts = build_splits(prefix, T, split="90,10,0", **kw)
    assert parts["valid"] is not None and parts["test"] is None


def test_held_out_corpora_from_their_own_paths(tmp_path):
    train, valid = write(tmp_path / "t", random_docs()), write(tmp_path / "v", random_docs(seed=1))
    kw = dict(eod_id=EOD, vocab_size=None, default_split="1,1,1", split=None)
    parts = build_splits(train, T, valid_path=valid, **kw)
    assert parts["train"].num_tokens == IndexedDataset(train).num_tokens + 60  # all of it, one EOD per document
    assert parts["valid"].indexed.prefix == valid and parts["test"] is None
    with pytest.raises(ConfigError, match=r"^--valid-data-path .*missing: no indexed dataset there"):
        build_splits(train, T, valid_path=str(tmp_path / "missing"), **kw)
    with pytest.raises(ConfigError, match=r"^--valid-data-path is needed with --test-data-path"):
        build_splits(train, T, test_path=valid, **kw)
    with pytest.raises(ConfigError, match=r"^--split cannot be combined"):
        build_splits(train, T, valid_path=valid, **{**kw, "split": "1,1,1"})


def test_default_corpus_splits_share_no_source_file(tmp_path):
    prefix, _ = default_corpus(vocab_size=300, max_bytes=1_500_000, cache_dir=tmp_path)
    files = stdlib_documents(1_500_000)
    assert len(files) == json.loads((Path(prefix).parent / "meta.json").read_text())["documents"]
    ranges = split_documents(IndexedDataset(prefix).num_documents, parse_split(DEFAULT_CORPUS_SPLIT))
    parts = [{files[d] for d in r} for r in ranges]
    assert all(parts) and sum(map(len, parts)) == len(files) == len(set(files))
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])


def test_a_held_out_corpus_too_small_for_a_sample_names_its_flag(tmp_path):
    train, tiny = write(tmp_path / "t", random_docs()), write(tmp_path / "v", [[5, 6]])
    with pytest.raises(ConfigError, match=r"^--valid-data-path .*v, too few tokens for one sample"):
        build_splits(train, T, eod_id=EOD, vocab_size=None, split=None, default_split="1,1,1", valid_path=tiny)
