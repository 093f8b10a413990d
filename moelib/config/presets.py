"""Named model shapes for ``ModelConfig.from_preset``: field -> value, applied over ModelConfig's defaults."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # ~10M parameters: trains on 2 CPU cores in minutes. Shared + routed experts, 4 groups of 4
    # experts with 2 kept, one MTP depth.
    "tiny": dict(
        vocab_size=4096, hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1,
        intermediate_size=768, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=128, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=1024,
    ),
    # ~100M parameters, for benchmarks.
    "small": dict(
        vocab_size=16384, hidden_size=512, num_hidden_layers=8, first_k_dense_replace=1,
        intermediate_size=1536, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
        n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=256, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=2048,
    ),
    # DeepSeek-V2-Lite (16B): plain query projection, softmax scores, no groups, no MTP.
    "v2-lite-16b": dict(
        vocab_size=102400, hidden_size=2048, num_hidden_layers=27, first_k_dense_replace=1,
        intermediate_size=10944, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408, n_group=1, topk_group=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
        aux_loss_alpha=0.001, num_nextn_predict_layers=0, max_position_embeddings=163840, init_std=0.02,
        rope_scaling=dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                          beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
    ),
    # DeepSeek-V3 (671B) as released.
    "v3-671b": dict(
        max_position_embeddings=163840,
        rope_scaling=dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    ),
}
