"""Weights cast or quantised once per optimizer step (moelib.precision.weight_cache): reused while a weight is
unchanged, rebuilt after any write to it, and training is bit-identical to casting every time."""

import pytest
import torch

from moelib import ModelConfig, TrainConfig
from moelib.config import ParallelConfig
from moelib.model import build_model
from moelib.precision import weight_cache
from moelib.train.optimizer import build_optimizer
from moelib.train.parallel_trainer import ParallelTrainer
from moelib.train.schedules import lr_at

CFG = ModelConfig.from_preset("tiny", num_hidden_layers=2, vocab_size=300, hidden_size=64, intermediate_size=96,
                              moe_intermediate_size=32, n_routed_experts=8, n_group=4, topk_group=2,
                              num_experts_per_tok=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                              qk_rope_head_dim=16, v_head_dim=16, num_attention_heads=2)


def test_reused_inside_a_step_until_the_weight_changes():
    w = torch.nn.Parameter(torch.randn(8, 8))
    assert weight_cache.cast(w, torch.bfloat16) is not weight_cache.cast(w, torch.bfloat16)  # no scope: fresh
    with weight_cache.reuse():
        first = weight_cache.cast(w, torch.bfloat16)
        with weight_cache.reuse():
            assert weight_cache.cast(w, torch.bfloat16) is first
        with torch.no_grad():
            w.mul_(2)  # an in-place write inside the step is seen through the version counter
        second = weight_cache.cast(w, torch.bfloat16)
        assert second is not first and torch.equal(second, w.detach().to(torch.bfloat16))
        w.data = torch.randn(8, 8)  # .data reassigned: a new storage
        assert torch.equal(weight_cache.cast(w, torch.bfloat16), w.detach().to(torch.bfloat16))
    assert len(weight_cache._entries) == 0  # leaving the step drops every copy


@pytest.mark.parametrize("backend", ["bf16", "fp8-emulated"])
def test_fused_adamw_outside_a_step_never_sees_a_stale_copy(backend):
    """torch's fused AdamW does not bump version counters, so copies must not outlive ``reuse()``: a user's
    own loop (no scope) and moelib's Trainer (a scope per step) both train on the updated weights."""
    from moelib.train.trainer import Trainer

    seq = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    model = build_model(CFG, backend, seed=0).train()
    opt = build_optimizer(model, TrainConfig(lr=1e-2, min_lr=1e-3, lr_warmup_iters=0))
    w = model.layers["0"].self_attn.o_proj.weight
    version = w._version
    cfg = TrainConfig(lr=1e-2, min_lr=1e-3, lr_warmup_iters=0, bias_update_speed=0,
                      precision={"backend": backend})
    own = []
    for step in range(3):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with model.backend.autocast("cpu"):
            out = model.compute_loss(seq[:, :-1], seq[:, 1:], cfg.mtp_loss_weight)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        opt.zero_grad()
        own.append(out.lm_loss.item())
    assert w._version == version  # why the cache cannot rely on version counters alone
    trainer = Trainer(CFG, cfg, model=build_model(CFG, backend, seed=0))
    assert [trainer.train_step(seq[:, :-1], seq[:, 1:]).lm_loss for _ in range(3)] == own


@pytest.mark.parametrize("backend", ["bf16", "fp8-emulated"])
def test_training_is_bit_identical_to_casting_every_time(backend, monkeypatch):
    """Four micro-batches a step, ZeRO AdamW: with and without the cache the losses agree bit for bit."""
    seq = torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1))

    def losses():
        trainer = ParallelTrainer(CFG, TrainConfig(micro_batch_size=1, seq_length=16, lr=1e-2, min_lr=1e-3,
                                                   precision={"backend": backend}),
                                  ParallelConfig(num_microbatches=4))
        return [trainer.train_step(seq[:, :-1], seq[:, 1:]).loss for _ in range(3)]

    cached = losses()
    monkeypatch.setattr(weight_cache, "cached", lambda weight, key, make: make())
    assert losses() == cached
