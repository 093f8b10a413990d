"""A thin wrapper over a Hugging Face ``tokenizers`` tokenizer.json, local byte-level BPE training, and the
files that let ``transformers.AutoTokenizer`` load it beside a checkpoint or an export."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from moelib.errors import DataError

EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens of common tokenizers, tried in order when none is named.
EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "<｜end▁of▁sentence｜>", "</s>", "<eos>", "<|eos|>")


class Tokenizer:
    """encode/decode text, ``vocab_size`` and the end-of-document id ``eod`` packing puts between documents.

    Without ``eod_token`` the first of EOD_CANDIDATES the vocabulary has is used; none found raises
    DataError unless ``require_eod`` is False (then ``eod`` is None).
    """

    def __init__(self, tokenizer: HFTokenizer, eod_token: str | None = None, path: str | None = None,
                 require_eod: bool = True):
        self.hf = tokenizer
        self.path = path
        where = f"Tokenizer {path}" if path else "The tokenizer"
        if eod_token is not None and tokenizer.token_to_id(eod_token) is None:
            raise DataError(f"{where} has no end-of-document token {eod_token!r}.")
        if eod_token is None:
            eod_token = next((t for t in EOD_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
        if eod_token is None and require_eod:
            raise DataError(f"{where} has none of the end-of-document tokens {', '.join(EOD_CANDIDATES)}; "
                            f"name its token explicitly.")
        self.eod_token = eod_token
        self.eod = tokenizer.token_to_id(eod_token) if eod_token is not None else None

    @classmethod
    def from_file(cls, path: str | os.PathLike, eod_token: str | None = None, require_eod: bool = True) -> Tokenizer:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"Tokenizer file {path} does not exist (expected a Hugging Face tokenizer.json).")
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"Tokenizer file {path} is not a valid Hugging Face tokenizer.json ({first}).") from None
        return cls(tok, eod_token, path, require_eod)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # No BOS/EOS by default: packing adds the EOD itself, and pretraining text is plain text.
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | os.PathLike) -> None:
        self.hf.save(os.fspath(path))
        self.path = os.fspath(path)


def train_bpe(source: Iterable[str] | Sequence[os.PathLike], vocab_size: int, *,
              special_tokens: Sequence[str] = (EOD_TOKEN,), min_frequency: int = 2,
              save_path: str | os.PathLike | None = None) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) locally. Deterministic for the same input.

    ``source`` is an iterable of texts (each ``str`` is a text, never a file name) or a sequence of
    ``pathlib.Path`` files read line by line. All 256 byte symbols are always in the vocabulary, so any
    text encodes and ``decode(encode(text)) == text``. The first special token is the end-of-document token.
    """
    if not special_tokens:
        raise DataError("A BPE for pretraining needs at least one special token, the end-of-document token.")
    if vocab_size < 256 + len(special_tokens):
        raise DataError(f"A byte-level BPE needs vocab_size >= {256 + len(special_tokens)} "
                        f"(256 bytes + special tokens), got {vocab_size}.")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    items = source if isinstance(source, (list, tuple)) else None
    if items and all(isinstance(p, os.PathLike) for p in items):
        for p in items:
            if not os.path.isfile(p):
                raise DataError(f"BPE training file {os.fspath(p)} does not exist.")
        tok.train([os.fspath(p) for p in items], trainer)
    else:
        tok.train_from_iterator(source, trainer)
    wrapped = Tokenizer(tok, special_tokens[0])
    if save_path is not None:
        wrapped.save(save_path)
    return wrapped



def write_hf_tokenizer(tokenizer_json: str | os.PathLike, out_dir: str | os.PathLike,
                       model_max_length: int | None = None) -> list[str]:
    """The files written: ``tokenizer.json`` copied into ``out_dir`` (unless already there) with the
    tokenizer_config.json and special_tokens_map.json that ``AutoTokenizer.from_pretrained(out_dir)`` reads.

    The end-of-document token serves as BOS, EOS and padding (as GPT-2's ``<|endoftext|>``); nothing is added
    when encoding, so transformers' ids equal ``Tokenizer.encode``'s."""
    tok = Tokenizer.from_file(tokenizer_json, require_eod=False)
    out = Path(out_dir)
    if not (out / "tokenizer.json").exists() or not (out / "tokenizer.json").samefile(tokenizer_json):
        shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    special = {} if tok.eod_token is None else {k: tok.eod_token for k in ("bos_token", "eos_token", "pad_token")}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
