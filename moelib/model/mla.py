"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are rebuilt from one compressed latent c_kv (kv_lora_rank wide) plus a single RoPE key
shared by all heads, so an inference cache holds kv_lora_rank + qk_rope_head_dim values per token.
Queries come from their own low-rank latent (or a plain projection when q_lora_rank is None).

At inference ``forward`` takes one layer's view of a KV cache (moelib.inference.cache) holding only the
normalised c_kv and the rotated k_pe. Its ``update(c_kv, k_pe)`` stores this call's tokens and returns every
cached token's [c_kv; k_pe] with the additive mask [B, T, S]; its ``absorb`` picks the attention path: absorbed
(W_UK folded into the query, W_UV applied after attention, as V2 §2.1) or naive (K and V rebuilt, the
reference).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moelib.config import ModelConfig
from moelib.model.attention import causal_attention
from moelib.model.norm import RMSNorm
from moelib.model.recompute import checkpoint, keep_attention_core, should_recompute
from moelib.model.rope import apply_rope, rotate, softmax_scale
from moelib.precision.backends import Backend, Linear
from moelib.precision.fp8 import TILE, dequantize
from moelib.precision.linear import shared_input


class MLA(nn.Module):
    # Set by moelib.train.recompute.apply_recompute: keep the latents q_in / kv_in and the attention core's
    # results; rerun the up-projections, their norms and RoPE in backward (V3).
    recompute_up_proj = False

    def __init__(self, cfg: ModelConfig, backend: Backend):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = softmax_scale(cfg)
        h, qk = cfg.hidden_size, cfg.num_attention_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(h, qk, backend)
        else:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, backend)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, qk, backend)
        self.kv_a_proj_with_mqa = Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, backend)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), backend)
        # V3 caches this projection's input with power-of-two scales under FP8; the backend decides.
        self.o_proj = Linear(self.n_heads * self.v_dim, h, backend, pow2_input=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        return self.o_proj(self.output_heads(x, cos, sin, cache))

    def forward_again(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cache=None) -> tuple[torch.Tensor, Callable[[], torch.Tensor] | None]:
        """(``forward(...)``, a function recomputing it from what o_proj keeps, or None: Linear.forward_again)."""
        return self.o_proj.forward_again(self.output_heads(x, cos, sin, cache))

    def output_heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        """The attention output, heads concatenated [B, T, heads·v_head_dim]: o_proj's input."""
        bsz, seqlen, _ = x.shape
        with shared_input(x):  # one FP8 copy of x kept for both projections, as V3's one fused GEMM
            q_in = self.q_proj(x) if hasattr(self, "q_proj") else self.q_a_proj(x)
            kv_in = self.kv_a_proj_with_mqa(x)
        if cache is not None:
            out = self.attend_cached(q_in, kv_in, cos, sin, cache)
            return out.reshape(bsz, seqlen, self.n_heads * self.v_dim)
        if should_recompute(self.recompute_up_proj):
            out = checkpoint(self.attend, q_in, kv_in, cos, sin, keep=keep_attention_core)
        else:
            out = self.attend(q_in, kv_in, cos, sin)
        return out.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.v_dim)

    def attend(self, q_in: torch.Tensor, kv_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """From the latents to the attention output [B, heads, T, v_head_dim]: up-projections, RoPE, core.

        q_in: the q_a_proj output (the query itself without q_lora_rank); kv_in: [c_kv; k_pe].
        """
        bsz, seqlen, _ = q_in.shape
        q = self.q_b_proj(self.q_a_layernorm(q_in)) if hasattr(self, "q_b_proj") else q_in
        q_nope, q_pe = q.view(bsz, seqlen, self.n_heads, self.nope_dim + self.rope_dim).split(
            [self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = kv_in.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(bsz, seqlen, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).expand(-1, -1, self.n_heads, -1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe.to(k_nope.dtype)], dim=-1).transpose(1, 2)
        return causal_attention(q, k, v.transpose(1, 2), self.scale)

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [heads, nope, rank], W_UV [heads, v, rank]) in ``dtype``, split from kv_b_proj's weight. An
        FP8-resident weight (block scales in ``scale_inv``) is dequantised here, as V3's inference model does."""
        w = self.kv_b_proj.weight
        if hasattr(w, "scale_inv"):
            w = dequantize(w, w.scale_inv, (TILE, TILE), dtype)
        w = w.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w.to(dtype).split([self.nope_dim, self.v_dim], dim=1)

    def attend_cached(self, q_in: torch.Tensor, kv_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cache) -> torch.Tensor:
        """Attention of this call's tokens over the cache, [B, T, heads, v_head_dim]; cos/sin are the rotation
        factors per sequence (rope_tables). Scores are [B, T, heads, S]: the heads of a token are rows of one
        GEMM over the cached tokens."""
        bsz, seqlen, _ = q_in.shape
        q = self.q_b_proj(self.q_a_layernorm(q_in)) if hasattr(self, "q_b_proj") else q_in
        q_nope, q_pe = q.view(bsz, seqlen, self.n_heads, self.nope_dim + self.rope_dim).split(
            [self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = kv_in.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent, mask = cache.update(self.kv_a_layernorm(c_kv), rotate(k_pe.unsqueeze(2), cos, sin).squeeze(2))
        latent = latent.to(q_nope.dtype)  # [B, S, rank + rope]: c_kv, then k_pe
        c_all, pe_all = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        q_pe = rotate(q_pe, cos, sin)
        rows = bsz * seqlen  # (token, head) pairs per head: [heads, B·T, ...] for the per-head GEMMs
        if cache.absorb:
            # [heads, nope + v, rank]: score = (q_nope W_UK) · c_kv, out = (P · c_kv) W_UVᵀ; K and V never exist.
            w_uk, w_uv = self.absorbed_weights(q_nope.dtype)
            q_lat = torch.bmm(q_nope.reshape(rows, self.n_heads, -1).transpose(0, 1), w_uk).transpose(0, 1)
            query = torch.cat([q_lat.reshape(bsz, seqlen * self.n_heads, -1),
                               q_pe.reshape(bsz, seqlen * self.n_heads, -1)], dim=-1)
            scores = torch.bmm(query, latent.transpose(1, 2)).view(bsz, seqlen, self.n_heads, -1)
        else:
            kv = self.kv_b_proj(c_all).view(bsz, c_all.shape[1], self.n_heads, self.nope_dim + self.v_dim)
            k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
            scores = (torch.einsum("bthd,bshd->bths", q_nope, k_nope.to(q_nope.dtype))
                      + torch.einsum("bthr,bsr->bths", q_pe, pe_all))
        # scale·scores + mask (0 or -inf) in fp32, as the masked scaled scores
        probs = torch.softmax(torch.add(mask[:, :, None], scores.float(), alpha=self.scale), dim=-1).to(q_nope.dtype)
        if cache.absorb:
            out_lat = torch.bmm(probs.view(bsz, seqlen * self.n_heads, -1), c_all)
            # W_UV · out_latᵀ per head: [heads, v, rows], the weight read in its own layout (2x faster than
            # out_lat · W_UVᵀ on CPU, the same bits)
            out = torch.bmm(w_uv, out_lat.view(rows, self.n_heads, -1).permute(1, 2, 0))
            return out.permute(2, 0, 1).view(bsz, seqlen, self.n_heads, self.v_dim)
        return torch.einsum("bths,bshd->bthd", probs, v.to(probs.dtype))
