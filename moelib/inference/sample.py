"""The end of a training run: a greedy continuation of a held-out prompt by the checkpoint just saved.

One process loads the checkpoint (``load_model`` on the CPU, in the training precision's dtype: bf16 unless the
run trained in fp32, half of fp32's resident bytes) and generates; no collectives, so the other ranks of the
run need not wait for it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from moelib.inference.generate import generate
from moelib.inference.load import load_model

PROMPT_TOKENS = 32
HEADER = "sample (held-out prompt | greedy continuation): "


def held_out_prompt(dataset: Sequence, length: int) -> list[int]:
    """The first ``length`` tokens of ``dataset``'s first sample (a PackedDataset: the valid split)."""
    return [int(t) for t in dataset[0][:length]]


def sample_line(checkpoint: str | os.PathLike, dataset: Sequence, tokenizer, max_new_tokens: int,
                dtype: str = "bf16") -> str:
    """``HEADER + repr(prompt text) | repr(continuation)``: ``max_new_tokens`` greedy tokens after the first
    PROMPT_TOKENS tokens of the held-out ``dataset`` (fewer when the model's positions would not hold both),
    decoded with ``tokenizer`` (a moelib.train.tokenizer.Tokenizer, or anything with ``decode(ids)``), by the
    model with its weights in ``dtype`` (load_model's)."""
    model = load_model(checkpoint, dtype)
    prompt = held_out_prompt(dataset, min(PROMPT_TOKENS, model.cfg.max_position_embeddings - max_new_tokens))
    new = generate(model, [prompt], max_new_tokens).tokens[0, len(prompt):].tolist()
    return f"{HEADER}{tokenizer.decode(prompt)!r} | {tokenizer.decode(new)!r}"
