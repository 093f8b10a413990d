import copy

import pytest
import torch
import torch.nn.functional as F

from moelib import DataError, ModelConfig
from moelib.model import build_model
from moelib.model.router import sequence_balance_loss

SMALL = dict(vocab_size=300, hidden_size=48, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=24,
             n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, q_lora_rank=24, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_attention_heads=3, init_std=0.05,
             max_position_embeddings=64)


def make(**overrides):
    cfg = ModelConfig.from_preset("tiny", **{**SMALL, **overrides})
    return cfg, build_model(cfg, "fp32", seed=0)


def tokens_for(cfg, shape, seed=0):
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bad", [-1, 300, 10**6])
def test_token_ids_outside_vocab_raise(bad):
    cfg, model = make()
    tokens = tokens_for(cfg, (2, 8))
    tokens[1, 3] = bad
    with pytest.raises(DataError, match=rf"token id {bad} is outside the vocabulary \[0, 300\)"):
        model(tokens)
    with pytest.raises(DataError, match="outside the vocabulary"):
        model.compute_loss(tokens, tokens)


def test_bad_shapes_raise():
    cfg, model = make()
    with pytest.raises(DataError, match="max_position_embeddings"):
        model(tokens_for(cfg, (1, 65)))
    with pytest.raises(DataError, match="labels shape"):
        model.compute_loss(tokens_for(cfg, (2, 8)), tokens_for(cfg, (2, 7)))
    with pytest.raises(DataError, match="int64 or int32"):
        model(torch.zeros(1, 4))


def test_mtp_loss_equals_sliced_reference():
    """compute_loss shifts and masks; the reference runs each depth on a shorter sequence instead."""
    cfg, model = make(num_nextn_predict_layers=2)
    model.eval()
    seq = tokens_for(cfg, (3, 17))
    tokens, labels = seq[:, :-1], seq[:, 1:]
    T = tokens.shape[1]
    with torch.no_grad():
        out = model.compute_loss(tokens, labels, mtp_weight=0.3)
        h = model.hidden_states(tokens)
        ref_main = F.cross_entropy(model.lm_head(h).flatten(0, 1), labels.flatten())
        ref_mtp = []
        for k, module in enumerate(model.mtp, start=1):
            n = T - k
            cos, sin = model.rope(n, tokens.device)
            h = module(h[:, :n], model.embed_tokens(seq[:, k:k + n]), cos, sin)
            ref_mtp.append(F.cross_entropy(model.lm_head(h).flatten(0, 1), seq[:, k + 1:k + 1 + n].flatten()))
    torch.testing.assert_close(out.lm_loss, ref_main, rtol=1e-6, atol=1e-6)
    for got, ref in zip(out.mtp_losses, ref_mtp, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, ref_main + 0.3 / 2 * sum(ref_mtp), rtol=1e-6, atol=1e-6)


def test_mtp_shares_embedding_and_head():
    cfg, model = make()
    names = [n for n, _ in model.named_parameters() if n.startswith("mtp.")]
    assert names and not any("embed" in n or "lm_head" in n for n in names)
    seq = tokens_for(cfg, (2, 9))
    out = model.compute_loss(seq[:, :-1], seq[:, 1:], mtp_weight=1.0)
    out.mtp_losses[0].backward()
    assert model.embed_tokens.weight.grad.abs().sum() > 0 and model.lm_head.weight.grad.abs().sum() > 0


def test_causal_no_future_leak_main_and_mtp():
    cfg, model = make()
    model.eval()
    seq = tokens_for(cfg, (1, 12))
    changed = seq.clone()
    changed[0, 8] = (changed[0, 8] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(seq), model(changed)
    # Equal up to summation order: routing the changed token regroups the expert GEMM rows.
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])
    # MTP at position i reads token i + 1, so a change at 8 may only affect positions >= 7.
    with torch.no_grad():
        h_a, h_b = model.hidden_states(seq), model.hidden_states(changed)
        cos, sin = model.rope(12, seq.device)
        emb = [model.embed_tokens(torch.roll(s, -1, 1)) for s in (seq, changed)]
        m_a, m_b = model.mtp[0](h_a, emb[0], cos, sin), model.mtp[0](h_b, emb[1], cos, sin)
    torch.testing.assert_close(m_a[:, :7], m_b[:, :7], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(m_a[:, 7:], m_b[:, 7:])


def test_bf16_autocast_close_to_fp32():
    cfg, model = make()
    model.eval()
    seq = tokens_for(cfg, (2, 16))
    with torch.no_grad():
        ref = model(seq)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(seq)
    assert float((low.float() - ref).norm() / ref.norm()) < 3e-2


def test_router_bias_is_a_buffer_and_gate_gets_gradients():
    cfg, model = make()
    seq = tokens_for(cfg, (2, 9))
    model.compute_loss(seq[:, :-1], seq[:, 1:]).loss.backward()
    moe = next(iter(model.moe_layers().values()))
    assert "e_score_correction_bias" not in dict(moe.gate.named_parameters())
    assert "gate.e_score_correction_bias" in moe.state_dict()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_balance_loss_gradient_reaches_the_router():
    """AuxLossBackprop adds exactly d(alpha * L_bal)/dW to the gate's gradient."""
    cfg, model = make(aux_loss_alpha=0.5)
    moe = next(iter(model.moe_layers().values())).train()
    x = torch.randn(2, 6, cfg.hidden_size)
    (moe(x) * 0).sum().backward()
    indices, _, scores = moe.gate(x.reshape(-1, cfg.hidden_size))
    ref = torch.autograd.grad(0.5 * sequence_balance_loss(scores, indices, 2, cfg.num_experts_per_tok),
                              moe.gate.weight)[0]
    torch.testing.assert_close(moe.gate.weight.grad, ref)
    assert ref.abs().sum() > 0


def test_load_counts_cover_every_routed_slot():
    cfg, model = make()
    model.train()
    seq = tokens_for(cfg, (2, 10))
    model.compute_loss(seq, seq)
    for name, moe in model.moe_layers().items():
        assert moe.load_counts.sum() == 2 * 10 * cfg.num_experts_per_tok, name


def test_state_dict_round_trip_and_strict_loading():
    cfg, model = make()
    other = build_model(cfg, "fp32", seed=1)
    other.load_state_dict(model.state_dict())
    seq = tokens_for(cfg, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(seq), other(seq))
    broken = copy.copy(model.state_dict())
    del broken["layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(RuntimeError, match=r"layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        other.load_state_dict(broken)
