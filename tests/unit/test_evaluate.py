"""Held-out evaluation of one model: the training loss's numbers, top-1 accuracy, nothing training reads changed."""

import math

import pytest
import torch

from moelib import ModelConfig
from moelib.model import build_model
from moelib.train.evaluate import evaluate_model


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.from_preset(
        "tiny", vocab_size=128, hidden_size=32, num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16,
        n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=8,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_attention_heads=2, num_nextn_predict_layers=2,
        init_std=0.05)
    return build_model(cfg, "fp32", seed=3)


def batches(n=2, b=4, t=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows = torch.randint(0, 128, (b, t + 1), generator=gen)
        out.append((rows[:, :-1], rows[:, 1:]))
    return out


def test_held_out_loss_is_the_training_loss_of_the_same_tokens(model):
    data = batches(n=1)
    r = evaluate_model(model, data, micro_batch_size=4)
    with torch.no_grad():
        out = model.compute_loss(*data[0], mtp_weight=0.3)
    assert r.loss == pytest.approx(float(out.lm_loss), rel=1e-5)
    assert r.mtp_loss == pytest.approx([float(x) for x in out.mtp_losses], rel=1e-5) and len(r.mtp_loss) == 2
    assert r.ppl == pytest.approx(math.exp(r.loss)) and r.tokens == 4 * 12


def test_top1_accuracy_counts_argmax_hits(model):
    data = batches(n=1)
    with torch.no_grad():
        logits = model(data[0][0])
    want = float((logits.argmax(-1) == data[0][1]).float().mean())
    assert evaluate_model(model, data, micro_batch_size=2).acc == pytest.approx(want)


def test_micro_batching_does_not_change_the_result(model):
    data = batches()
    a, b = evaluate_model(model, data, micro_batch_size=1), evaluate_model(model, data, micro_batch_size=4)
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.mtp_acc == b.mtp_acc and a.max_vio == b.max_vio
    assert a.max_vio > 0  # the held-out loads were counted


def test_evaluation_changes_nothing_training_reads(model):
    for moe in model.moe_layers().values():
        moe.load_counts.fill_(7.0)  # a step's counts in progress
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    evaluate_model(model, batches(), micro_batch_size=2)
    assert torch.equal(rng, torch.random.get_rng_state())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(bool((moe.load_counts == 7.0).all()) for moe in model.moe_layers().values())
    assert all(p.grad is None for p in model.parameters())


def test_metrics_keys(model):
    m = evaluate_model(model, batches(n=1), micro_batch_size=4).metrics("valid")
    assert {"valid_loss", "valid_ppl", "valid_acc", "valid_max_vio", "valid_mtp_loss", "valid_mtp_acc",
            "valid_mtp1_loss", "valid_mtp2_acc"} <= m.keys()
    assert m["valid_mtp_loss"] == pytest.approx((m["valid_mtp1_loss"] + m["valid_mtp2_loss"]) / 2)
