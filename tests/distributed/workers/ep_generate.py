"""mpirun worker: generation with the routed experts sharded over the ranks gives the single-process tokens.

Every rank builds the same model from one seed and generates once unsharded (no communication: the
reference), then shards the experts (moelib.inference.expert_parallel) and generates again: greedy, MTP
speculative greedy, and sampled with the same seed. Each rank prints one ``EPRESULT {json}`` line.
"""

from __future__ import annotations

import json

import torch

from moelib.config import ModelConfig
from moelib.inference.expert_parallel import SyncedSampler, expert_parallel
from moelib.inference.generate import generate
from moelib.inference.sampling import Sampler
from moelib.model.transformer import build_model

CFG = dict(vocab_size=64, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=96,
           num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
           moe_intermediate_size=32, init_std=0.1, max_position_embeddings=64)
PROMPTS = [[5, 9, 2, 7, 1], [3], [8, 8, 4, 0, 6, 2, 9, 11]]
RUNS = {"greedy": dict(), "mtp-greedy": dict(speculative="mtp"),
        "sampled": dict(temperature=1.0, top_p=0.9, speculative="mtp")}


def run_all(model, make_sampler) -> dict[str, list[list[int]]]:
    return {name: generate(model, PROMPTS, 10, sampler=make_sampler(), **kw).tokens.tolist()
            for name, kw in RUNS.items()}


def main() -> None:
    torch.set_num_threads(1)
    model = build_model(ModelConfig.from_preset("tiny", **CFG), "fp32", seed=0).eval()
    reference = run_all(model, lambda: Sampler(5))
    env = expert_parallel(model)
    local = [m.experts.num_experts for m in model.moe_layers().values()]
    sharded = run_all(model, lambda: SyncedSampler(5))
    print("EPRESULT " + json.dumps({"rank": env.rank, "world": env.world_size, "local_experts": local,
                                    "equal": {k: sharded[k] == reference[k] for k in RUNS}}), flush=True)


if __name__ == "__main__":
    main()
