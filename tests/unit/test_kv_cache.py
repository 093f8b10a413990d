"""The MLA KV cache: cached prefill + decode gives the full forward's logits, main model and MTP."""

import pytest
import torch

from moelib import ModelConfig, YarnConfig
from moelib.inference.cache import KVCache
from moelib.model import build_model
from moelib.model.transformer import shift_left

SMALL = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=96,
             num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
             moe_intermediate_size=32, init_std=0.1, max_position_embeddings=64,
             rope_scaling=YarnConfig(factor=4.0, original_max_position_embeddings=16))


def tiny_model(**overrides):
    cfg = ModelConfig.from_preset("tiny", **{**SMALL, **overrides})
    return build_model(cfg, "fp32", seed=0).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def full_logits(model, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Main and MTP-depth-1 logits of one unpadded sequence [T] at every position (MTP: the last one
    has no next token)."""
    tokens = seq[None]
    h = model.hidden_states(tokens)
    if not len(model.mtp):
        return model.lm_head(h)[0], None
    cos, sin = model.rope(tokens.shape[1], tokens.device)
    g = model.mtp[0](h, model.embed(shift_left(tokens, 1, 0)), cos, sin)
    return model.lm_head(h)[0], model.lm_head(g)[0]


@pytest.mark.parametrize("absorb", [True, False], ids=["absorb", "naive"])
@pytest.mark.parametrize("mtp", [1, 0], ids=["mtp", "no-mtp"])
@torch.no_grad()
def test_cached_decode_equals_full_forward(absorb, mtp, one_thread):
    model = tiny_model(num_nextn_predict_layers=mtp)
    cfg = model.cfg
    lengths, steps = [5, 9, 2], [1, 1, 2, 1, 3]  # prompts of unequal length; decode steps of 1-3 tokens
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, cfg.vocab_size, (n + sum(steps) + 1,), generator=gen) for n in lengths]
    width = max(lengths)
    pad = torch.tensor([width - n for n in lengths])
    # Slot s of sequence b holds its token s - pad[b] (left padding; token 0 fills the pad slots).
    slots = torch.stack([torch.cat([torch.zeros(int(p), dtype=torch.long), s]) for p, s in zip(pad, seqs)])
    refs = [full_logits(model, s) for s in seqs]
    main = KVCache(cfg.num_hidden_layers, cfg, len(lengths), slots.shape[1], pad=pad, absorb=absorb)
    mtp_cache = KVCache(1, cfg, len(lengths), slots.shape[1], pad=pad, absorb=absorb)
    end = 0
    for t in [width, *steps]:
        start, end = end, end + t
        h = model.cached_hidden_states(slots[:, start:end], main)
        last = [int(end - 1 - p) for p in pad]  # each sequence's position of the last new token
        ours = model.lm_head(h[:, -1])
        theirs = torch.stack([r[0][i] for r, i in zip(refs, last)])
        assert rel_err(ours, theirs) <= 1e-5
        if mtp:
            g = model.cached_mtp(0, h, slots[:, start + 1:end + 1], mtp_cache)
            theirs = torch.stack([r[1][i] for r, i in zip(refs, last)])
            assert rel_err(model.lm_head(g[:, -1]), theirs) <= 1e-5
    assert main.length == end


@torch.no_grad()
def test_rolled_back_slots_are_recomputed(one_thread):
    model = tiny_model()
    seq = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(4))
    cache = KVCache(2, model.cfg, 1, 12)
    model.cached_hidden_states(seq[:, :8], cache)
    model.cached_hidden_states(torch.tensor([[7, 9, 11]]), cache)  # drafts, then rejected
    cache.rollback(3)
    h = model.cached_hidden_states(seq[:, 8:], cache)
    assert rel_err(model.lm_head(h[:, -1]), model(seq)[:, -1]) <= 1e-5


def test_bytes_per_token_is_layers_times_latent_and_rope_width():
    cfg = ModelConfig.from_preset("tiny", **SMALL)
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache(cfg.num_hidden_layers, cfg, 2, 8, dtype=dtype)
        assert cache.bytes_per_token() == cfg.num_hidden_layers * (16 + 8) * dtype.itemsize
