"""``moelib.generate``: prefill the prompts into the MLA KV cache, then decode a token per main forward (or,
with ``speculative="mtp"``, verify MTP drafts)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from moelib.errors import ConfigError, DataError
from moelib.inference.cache import KVCache
from moelib.inference.sampling import Sampler, check_sampling, distribution
from moelib.inference.static import StaticStep, check_static, static_length
from moelib.model.transformer import Transformer, check_token_ids


@dataclass
class Generation:
    tokens: torch.Tensor                       # [B, T + N], prompts left-padded with pad_token_id
    stats: dict = field(default_factory=dict)  # main_forwards, drafted, accepted, acceptance_rate, ...


def as_prompts(input_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The prompts as 1-D LongTensors (a [B, T] tensor is B prompts of T tokens)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise DataError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        rows = list(input_ids)
    else:
        rows = [torch.as_tensor(list(p), dtype=torch.long) for p in input_ids]
    if not rows or any(r.numel() == 0 for r in rows):
        raise DataError("the prompt (input_ids, --prompt) is empty; give at least one token")
    return rows


def check_request(model: Transformer, prompts: list[torch.Tensor], max_new_tokens: int, *, temperature: float,
                  top_k: int, top_p: float, speculative: str | None, attention: str) -> None:
    """Raise a moelib error naming the argument when a generation request cannot run on ``model``."""
    cfg = model.cfg
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens (--max-new-tokens) must be >= 1, got {max_new_tokens}")
    if attention not in ("absorb", "naive"):
        raise ConfigError(f"attention must be 'absorb' or 'naive', got {attention!r}")
    if speculative not in (None, "mtp"):
        raise ConfigError(f"speculative (--speculative) must be None or 'mtp', got {speculative!r}")
    if speculative == "mtp" and not len(model.mtp):
        raise ConfigError("speculative='mtp' (--speculative mtp) needs MTP modules, and this model has "
                          "num_nextn_predict_layers = 0")
    longest = max(p.numel() for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise DataError(f"the prompt ({longest} tokens) plus max_new_tokens (--max-new-tokens, {max_new_tokens}) "
                        f"exceeds max_position_embeddings ({cfg.max_position_embeddings})")
    for p in prompts:
        check_token_ids(p, cfg.vocab_size)


def left_pad(prompts: list[torch.Tensor], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T_max] prompts padded on the left with ``value``, pad count [B])."""
    width = max(p.numel() for p in prompts)
    tokens = torch.full((len(prompts), width), value, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, width - p.numel():] = p
    return tokens, torch.tensor([width - p.numel() for p in prompts])


def fill_after_eos(new: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """new [B, N] with every token after a sequence's first eos set to eos."""
    if eos_token_id is None:
        return new
    seen = (new == eos_token_id).long().cumsum(1)
    after = (seen - (new == eos_token_id).long()) > 0
    return new.masked_fill(after, eos_token_id)


def model_dtype(model: Transformer) -> torch.dtype:
    return model.norm.weight.dtype  # not the embedding's: it may be FP8-resident


@torch.no_grad()
def decode(model: Transformer, tokens: torch.Tensor, pad: torch.Tensor, max_new_tokens: int, sampler: Sampler, *,
           temperature: float, top_k: int, top_p: float, eos_token_id: int | None, absorb: bool,
           stream: Callable[[torch.Tensor], None] | None = None, compile: bool = False) -> tuple[torch.Tensor, dict]:
    """Plain decoding of a left-padded batch: (new tokens [B, N], stats); ``stream`` gets each step's [B, 1].
    ``compile``: the steps after the prefill run moelib.inference.static's compiled static-shape forward."""
    cfg, (batch, width) = model.cfg, tokens.shape
    device = model.embed_tokens.weight.device
    length = static_length(width + max_new_tokens) if compile else width + max_new_tokens
    cache = KVCache(cfg.num_hidden_layers, cfg, batch, length, pad=pad, absorb=absorb,
                    dtype=model_dtype(model), device=device)
    h = model.cached_hidden_states(tokens.to(device), cache)
    step = StaticStep(model, cache) if compile else partial(model.cached_hidden_states, cache=cache, checked=True)
    forwards, new = 1, []
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    while True:
        logits = model.lm_head(h[:, -1])
        x = (sampler.argmax(logits) if temperature == 0
             else sampler.categorical(distribution(logits, temperature, top_k, top_p)))
        new.append(x)
        if stream is not None:
            stream(x[:, None].cpu())
        if eos_token_id is not None:
            done |= x == eos_token_id
        if len(new) == max_new_tokens or bool(done.all()):
            break
        h = step(x[:, None])
        forwards += 1
    out = torch.stack(new, 1).cpu()
    if out.shape[1] < max_new_tokens:  # every sequence ended early
        out = torch.cat([out, out.new_full((batch, max_new_tokens - out.shape[1]), eos_token_id)], 1)
    return out, {"main_forwards": forwards, "drafted": 0, "accepted": 0,
                 "kv_bytes_per_token": cache.bytes_per_token()}


def generate(model: Transformer, input_ids: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
             seed: int | None = None, speculative: str | None = None, attention: str = "absorb",
             pad_token_id: int = 0, stream: Callable[[torch.Tensor], None] | None = None,
             sampler: Sampler | None = None, compile: bool = False) -> Generation:
    """Generation(tokens [B, T + N], stats) continuing each prompt by max_new_tokens tokens.

    ``input_ids``: a LongTensor [B, T], or a list of prompts of different lengths, which are left-padded
    (with ``pad_token_id``) and run at their own positions 0, 1, ..., so each continues exactly as it
    would alone. ``temperature`` 0 is greedy; else sampling from softmax(logits / temperature) cut to
    ``top_k`` tokens (0: all) and nucleus ``top_p``. After ``eos_token_id`` a sequence repeats it.
    ``speculative="mtp"``: the model's MTP depths, chained, draft a token each, one main forward verifies
    them with the speculative sampling rule, so the output distribution is the main model's (greedy: the
    same tokens in fp32); sequences are then decoded one at a time. ``attention``: "absorb" (default) or
    "naive" MLA over the cache.
    stats: main_forwards, drafted, accepted, acceptance_rate (accepted / drafted, 0 without drafts),
    kv_bytes_per_token (the main model's cache for one token of one sequence, all layers) and
    tokens_per_s (new tokens of all sequences over the wall time). ``stream`` is called with the new tokens
    [B, k] as they are produced (with speculative decoding, [1, k] of the sequence being decoded).
    ``sampler`` replaces the one ``seed`` would make (expert-parallel runs pass a SyncedSampler).
    ``compile``: decode steps (and speculative verifications) after the prefill run a static-shape forward
    compiled by torch.compile (moelib.inference.static; one process, fp32 or bf16 weights); the first request
    of each shape pays the compilation.
    """
    prompts = as_prompts(input_ids)
    check_request(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  speculative=speculative, attention=attention)
    if compile:
        check_static(model)
    sampler = sampler or Sampler(seed, model.embed_tokens.weight.device)
    tokens, pad = left_pad(prompts, pad_token_id)
    absorb = attention == "absorb"
    start = time.perf_counter()
    if speculative == "mtp":
        from moelib.inference.speculative import speculative_decode

        rows, stats = [], {}
        for p in prompts:
            row, s = speculative_decode(model, p[None], max_new_tokens, sampler, temperature=temperature,
                                        top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, absorb=absorb,
                                        stream=stream, compile=compile)
            rows.append(row)
            stats = {k: stats.get(k, 0) + v for k, v in s.items() if k != "kv_bytes_per_token"}
            stats["kv_bytes_per_token"] = s["kv_bytes_per_token"]
        new = torch.cat(rows)
    else:
        new, stats = decode(model, tokens, pad, max_new_tokens, sampler, temperature=temperature, top_k=top_k,
                            top_p=top_p, eos_token_id=eos_token_id, absorb=absorb, stream=stream,
                            compile=compile)
    seconds = time.perf_counter() - start
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
    stats["tokens_per_s"] = new.numel() / seconds if seconds > 0 else float("inf")
    return Generation(torch.cat([tokens, fill_after_eos(new, eos_token_id)], 1), stats)
