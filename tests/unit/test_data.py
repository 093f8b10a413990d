"""Packing, shuffling, resuming and sharding the data; the tokenizer; the default corpus; preprocess_data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moelib.errors import ConfigError, DataError
from moelib.train.data import BatchLoader, PackedDataset, _cache_key, default_corpus, default_dataset, stdlib_sources
from moelib.train.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from moelib.train.tokenizer import Tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[2]
EOD = 0
T = 8


def random_docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 1000, size=rng.integers(1, 30)).tolist() for _ in range(n)]


def write(prefix, docs):
    with IndexedDatasetBuilder(prefix, "uint16") as b:
        for doc in docs:
            b.add_document(doc)
    return prefix


@pytest.fixture
def docs():
    return random_docs()


@pytest.fixture
def dataset(tmp_path, docs):
    return PackedDataset(write(tmp_path / "c", docs), T, eod_id=EOD)


def stream_of(docs):
    return np.array([t for doc in docs for t in [*doc, EOD]])


# -- packing --------------------------------------------------------------------------------------

def test_packing_covers_every_token_once_in_order_with_eods(dataset, docs):
    stream = stream_of(docs)
    n = len(dataset)
    assert n == (len(stream) - 1) // T
    samples = [dataset[k] for k in range(n)]
    assert all(s.dtype == np.int64 and len(s) == T + 1 for s in samples)
    np.testing.assert_array_equal(np.concatenate([s[:-1] for s in samples]), stream[:n * T])  # inputs
    np.testing.assert_array_equal(np.concatenate([s[1:] for s in samples]), stream[1:n * T + 1])  # labels
    assert sum(int((s[:-1] == EOD).sum()) for s in samples) == int((stream[:n * T] == EOD).sum())


def test_eods_already_in_the_file_are_not_doubled(tmp_path, docs, dataset):
    with_eod = PackedDataset(write(tmp_path / "e", [[*d, EOD] for d in docs]), T, eod_id=EOD)
    assert len(with_eod) == len(dataset)
    for k in range(len(dataset)):
        np.testing.assert_array_equal(with_eod[k], dataset[k])


def test_packing_multi_sequence_and_empty_documents(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "m", "uint16") as b:
        b.add_document([1, 2, 3, 4, 5], [2, 3])  # two sentences, one document
        b.add_document([])  # empty: gets no EOD
        b.add_item([6])
        b.add_item([])
        b.end_document()
        b.add_document([7, 8, 9, 10, 11, 12, 13])
    ds = PackedDataset(tmp_path / "m", 4, eod_id=EOD)
    assert [ds[k].tolist() for k in range(len(ds))] == [[1, 2, 3, 4, 5], [5, 0, 6, 0, 7], [7, 8, 9, 10, 11]]
    plain = PackedDataset(tmp_path / "m", 4)  # no EOD: plain concatenation
    assert plain[0].tolist() == [1, 2, 3, 4, 5] and plain[1].tolist() == [5, 6, 7, 8, 9]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.lists(st.integers(0, 5), max_size=6), max_size=3), min_size=1, max_size=8),
       st.integers(1, 5))
def test_packing_matches_a_naive_reference(tmp_path_factory, docs, seq_length):
    """Any mix of sentences, empty sequences and documents already ending in EOD (id 0)."""
    prefix = tmp_path_factory.mktemp("h") / "c"
    with IndexedDatasetBuilder(prefix, "uint8") as b:
        for doc in docs:
            b.add_document([t for s in doc for t in s], [len(s) for s in doc])
    stream = []
    for doc in docs:
        flat = [t for s in doc for t in s]
        stream += flat + ([EOD] if flat and flat[-1] != EOD else [])
    n = (len(stream) - 1) // seq_length
    if n < 1:
        with pytest.raises(DataError):
            PackedDataset(prefix, seq_length, eod_id=EOD)
        return
    ds = PackedDataset(prefix, seq_length, eod_id=EOD)
    assert len(ds) == n
    for k in range(n):
        assert ds[k].tolist() == stream[k * seq_length:(k + 1) * seq_length + 1]


def test_too_small_corpus_names_the_file(tmp_path):
    prefix = write(tmp_path / "small", [[1, 2, 3]])
    with pytest.raises(DataError, match=str(tmp_path / "small.bin")):
        PackedDataset(prefix, 4, eod_id=EOD)
    assert len(PackedDataset(prefix, 3, eod_id=EOD)) == 1  # 4 tokens with the EOD: exactly one sample


def test_token_outside_vocabulary_names_the_file(tmp_path):
    prefix = write(tmp_path / "v", [[1, 2, 3, 500, 4, 5]])
    with pytest.raises(DataError, match="token id 500"):
        PackedDataset(prefix, 4, eod_id=EOD, vocab_size=100)[0]


# -- batches, shuffling, resuming, sharding -------------------------------------------------------

def batches(loader, steps, sizes=None):
    return [loader.next_batch(None if sizes is None else sizes[i]) for i in range(steps)]


def test_batches_are_int64_and_labels_are_inputs_shifted(dataset):
    tokens, labels = BatchLoader(dataset, 4, seed=1).next_batch()
    assert tokens.shape == labels.shape == (4, T) and tokens.dtype == labels.dtype == torch.int64
    torch.testing.assert_close(tokens[:, 1:], labels[:, :-1])


def test_each_epoch_visits_every_sample_once_and_reshuffles(dataset):
    n = len(dataset)
    loader = BatchLoader(dataset, 1, seed=3)
    epochs = [[tuple(loader.next_batch()[0][0].tolist()) for _ in range(n)] for _ in range(2)]
    every = sorted(tuple(dataset[k][:-1].tolist()) for k in range(n))
    assert sorted(epochs[0]) == every and sorted(epochs[1]) == every
    assert epochs[0] != epochs[1] and loader.epoch == 2


def test_shuffle_is_deterministic_from_the_seed(dataset):
    a, b, c = (batches(BatchLoader(dataset, 4, seed=s), 5) for s in (7, 7, 8))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_resume_from_state_dict_yields_the_same_next_batches(dataset):
    sizes = [4, 4, 8, 8, 12, 12, 12, 12, 12, 12]  # a batch-size ramp, crossing an epoch boundary
    assert sum(sizes) > len(dataset)
    straight = batches(BatchLoader(dataset, 4, seed=5), len(sizes), sizes)
    first = BatchLoader(dataset, 4, seed=5)
    batches(first, 4, sizes)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint manifest stores
    assert all(isinstance(v, int) for v in state.values())
    resumed = BatchLoader(dataset, 4, seed=5)
    resumed.load_state_dict(state)
    for got, want in zip(batches(resumed, 6, sizes[4:]), straight[4:]):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_state_from_another_stream_is_refused(dataset):
    state = BatchLoader(dataset, 4, seed=5).state_dict()
    with pytest.raises(DataError, match="seed"):
        BatchLoader(dataset, 4, seed=6).load_state_dict(state)
    with pytest.raises(DataError, match="not a loader state"):
        BatchLoader(dataset, 4, seed=5).load_state_dict({"consumed_samples": 3})


@pytest.mark.parametrize("world", [2, 4])
def test_dp_ranks_partition_the_global_batch(dataset, world):
    whole = batches(BatchLoader(dataset, 8, seed=2), 3)
    ranks = [batches(BatchLoader(dataset, 8, seed=2, dp_rank=r, dp_size=world), 3) for r in range(world)]
    for step in range(3):
        assert torch.equal(torch.cat([ranks[r][step][0] for r in range(world)]), whole[step][0])
        assert ranks[0][step][0].shape == (8 // world, T)
    # The position is global, so a run saved at one DP size resumes at another.
    single = BatchLoader(dataset, 8, seed=2)
    batches(single, 2)
    half = BatchLoader(dataset, 8, seed=2, dp_rank=1, dp_size=world)
    half.load_state_dict(single.state_dict())
    assert torch.equal(half.next_batch()[0], whole[2][0][8 // world:2 * 8 // world])


def test_global_batch_must_divide_by_dp_size(dataset):
    with pytest.raises(ConfigError, match="global_batch_size"):
        BatchLoader(dataset, 6, dp_size=4).next_batch()


# -- tokenizer ------------------------------------------------------------------------------------

TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n", "print('hello world')\n"] * 20


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(TEXTS, 300, save_path=path)
    return path


def test_tokenizer_round_trips_text(tokenizer_path):
    tok = Tokenizer.from_file(tokenizer_path)
    assert tok.vocab_size == 300 and tok.eod == 0 and tok.eod_token == "<|endoftext|>"
    for text in [*TEXTS[:3], "unseen: \u00e9\u00df\u4e2d \U0001f600\ttabs\r\n", ""]:
        ids = tok.encode(text)
        assert all(0 <= i < 300 for i in ids)
        assert tok.decode(ids) == text
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode())  # merges were learnt


def test_bpe_training_is_deterministic(tokenizer_path):
    again = train_bpe(iter(TEXTS), 300)
    assert again.hf.to_str() == Tokenizer.from_file(tokenizer_path).hf.to_str()


def test_tokenizer_file_errors(tmp_path, tokenizer_path):
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid"):
        Tokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(DataError, match="no end-of-document token"):
        Tokenizer.from_file(tokenizer_path, eod_token="<eos>")


# -- the default corpus ---------------------------------------------------------------------------

def test_default_corpus_builds_once_and_packs(tmp_path):
    stale = tmp_path / f".{_cache_key(300, 200_000)}.tmp-crashed"  # what a build killed midway leaves
    stale.mkdir()
    prefix, tok_path = default_corpus(vocab_size=300, max_bytes=200_000, cache_dir=tmp_path)
    entry = Path(prefix).parent
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["files"] > 0 and meta["bytes"] >= 200_000 and meta["tokens"] > 0
    stamp = os.stat(prefix + ".bin").st_mtime_ns
    assert default_corpus(vocab_size=300, max_bytes=200_000, cache_dir=tmp_path) == (prefix, tok_path)
    assert os.stat(prefix + ".bin").st_mtime_ns == stamp  # cached, not rebuilt
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [entry.name]  # no temp dirs
    tok = Tokenizer.from_file(tok_path)
    ds = default_dataset(300, 64, max_bytes=200_000, cache_dir=tmp_path)  # the cached entry, packed
    assert os.stat(prefix + ".bin").st_mtime_ns == stamp and ds.eod_id == tok.eod
    assert IndexedDataset(prefix).num_tokens == meta["tokens"] and len(ds) > 10
    sources = (p.read_text(encoding="utf-8", errors="replace") for p in stdlib_sources(200_000)[1])
    first_source = next(text for text in sources if text)  # empty files are skipped
    assert tok.decode(IndexedDataset(prefix).document(0)) == first_source + tok.eod_token


@pytest.mark.slow
def test_default_corpus_concurrent_builds_agree(tmp_path):
    code = ("import sys; from moelib.train.data import default_corpus; "
            "print(default_corpus(vocab_size=280, max_bytes=100_000, cache_dir=sys.argv[1])[0])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs[0] == outs[1]
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1
    assert IndexedDataset(outs[0]).num_documents > 0


@pytest.mark.slow
def test_real_default_corpus(tmp_path):
    prefix, tok_path = default_corpus(cache_dir=tmp_path)  # the tiny preset's 4096 vocabulary, full cap
    tok = Tokenizer.from_file(tok_path)
    assert tok.vocab_size == 4096
    ds = PackedDataset(prefix, 128, eod_id=tok.eod, vocab_size=tok.vocab_size)
    assert len(ds) > 1000
    tokens, labels = BatchLoader(ds, 8, seed=1234).next_batch()
    assert tokens.shape == (8, 128) and int(tokens.max()) < 4096


# -- tools/preprocess_data.py ---------------------------------------------------------------------

def preprocess(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_preprocess_data_end_to_end(tmp_path, tokenizer_path):
    records = [{"text": t, "id": i} for i, t in enumerate(TEXTS[:5])] + [{"text": ""}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}" / "corpus"
        result = preprocess("--input", src, "--output-prefix", out, "--tokenizer", tokenizer_path,
                            "--json-keys", "text", "--append-eod", "--workers", workers)
        assert result.returncode == 0, result.stderr
        outputs.append(Path(f"{out}_text_document"))
    for ext in (".bin", ".idx"):  # worker processes change nothing in the output
        assert outputs[0].with_suffix(ext).read_bytes() == outputs[1].with_suffix(ext).read_bytes()
    ds, tok = IndexedDataset(outputs[0]), Tokenizer.from_file(tokenizer_path)
    assert ds.num_documents == 5 and ds.dtype == np.uint16  # the empty text is skipped
    for d in range(5):
        ids = ds.document(d).tolist()
        assert ids[-1] == tok.eod and tok.decode(ids[:-1]) == TEXTS[d]


@pytest.mark.parametrize("case", ["missing input", "bad json", "missing key", "missing tokenizer", "no eod token"])
def test_preprocess_data_bad_input(tmp_path, tokenizer_path, case):
    src = tmp_path / "in.jsonl"
    src.write_text({"bad json": '{"text": "a"\n', "missing key": '{"body": "a"}\n'}.get(case, '{"text": "a"}\n'))
    args = ["--input", src, "--output-prefix", tmp_path / "out", "--tokenizer", tokenizer_path, "--append-eod"]
    if case == "missing input":
        args[1] = tmp_path / "none.jsonl"
    elif case == "missing tokenizer":
        args[5] = tmp_path / "none.json"
    elif case == "no eod token":
        args += ["--eod-token", "<eos>"]
    result = preprocess(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("preprocess_data: error: ") and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("out*"))  # nothing half-written


def test_preprocess_data_usage_error(tmp_path):
    assert preprocess("--input", tmp_path / "x.jsonl").returncode == 2
