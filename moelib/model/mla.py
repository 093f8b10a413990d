"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are rebuilt from one compressed latent c_kv (kv_lora_rank wide) plus a single RoPE key
shared by all heads, so an inference cache holds kv_lora_rank + qk_rope_head_dim values per token.
Queries come from their own low-rank latent (or a plain projection when q_lora_rank is None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelib.config import ModelConfig
from moelib.model.norm import RMSNorm
from moelib.model.rope import apply_rope, softmax_scale
from moelib.precision.backends import Backend, Linear


class MLA(nn.Module):
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

    def query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.query(x).view(bsz, seqlen, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(bsz, seqlen, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).expand(-1, -1, self.n_heads, -1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe.to(k_nope.dtype)], dim=-1).transpose(1, 2)
        # Attention core: high precision in V3 (bf16 under autocast, never FP8).
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.v_dim))
