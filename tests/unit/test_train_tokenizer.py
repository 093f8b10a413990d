"""tools/train_tokenizer.py: a byte-level BPE trained on the user's JSONL/text that moelib's data path loads and
that round-trips text; bad input is one line on stderr and a non-zero exit."""

import json
import subprocess
import sys
from pathlib import Path

from moelib.train.tokenizer import EOD_TOKEN, Tokenizer

TOOL = Path(__file__).resolve().parents[2] / "tools" / "train_tokenizer.py"


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120)


def test_trains_a_tokenizer_that_round_trips(tmp_path):
    docs = [{"text": f"def f{i}(x):\n    return x * {i}  # naïve 😀\n", "title": f"t{i}"} for i in range(200)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "b.txt").write_text("plain text documents are read whole. " * 50)
    out = tmp_path / "tok" / "tokenizer.json"
    done = train("--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt"), "--vocab-size", "320",
                 "--output", str(out))
    assert done.returncode == 0, done.stderr
    tok = Tokenizer.from_file(out)
    assert tok.vocab_size == 320 and tok.eod_token == EOD_TOKEN and tok.eod == 0
    for text in ("def f7(x):\n    return x * 7", "unseen: Ωμέγα \t\r\n ½", ""):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(docs[3]["text"])) < len(docs[3]["text"].encode()) / 2  # merges learned from the input
    config = json.loads((out.parent / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOD_TOKEN and config["tokenizer_class"] == "PreTrainedTokenizerFast"
    again = tmp_path / "again.json"
    assert train("--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt"), "--vocab-size", "320",
                 "--output", str(again)).returncode == 0
    assert json.loads(again.read_text()) == json.loads(out.read_text())  # deterministic


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    for args, message in [(["--input", str(tmp_path / "missing.txt")], "missing.txt does not exist"),
                          (["--input", str(tmp_path / "bad.jsonl")], "bad.jsonl:2 is not a valid JSON line"),
                          (["--input", str(tmp_path / "bad.jsonl"), "--vocab-size", "100"], "vocab_size >= 257")]:
        args = args if "--vocab-size" in args else [*args, "--vocab-size", "300"]
        done = train(*args, "--output", str(tmp_path / "t.json"))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
