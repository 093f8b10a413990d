"""dtype="fp8": E4M3 weights with 128x128 block scales stay resident (the Linears, experts and embedding);
GEMMs dequantise them per block, the absorbed MLA path and the embedding lookup their own way."""

import copy
import math

import pytest
import torch
from _hf import write_hf
from hypothesis import given, settings
from hypothesis import strategies as st

import moelib
from moelib import ModelConfig
from moelib.inference.cache import KVCache
from moelib.inference.fp8_weights import BLOCK, dequantized, fp8_bytes, fp8_parameter, resident_bytes
from moelib.inference.load import cast_bytes, cast_weights, to_bf16
from moelib.model import build_model
from moelib.model.embedding import embedding_lookup
from moelib.model.moe import GroupedExperts
from moelib.precision.backends import Linear

CFG = dict(num_hidden_layers=2, vocab_size=512, init_std=0.05, hidden_size=256, n_routed_experts=8)


def fp32_bf16_fp8(**overrides):
    fp32 = build_model(ModelConfig.from_preset("tiny", **{**CFG, **overrides}), "fp32", seed=0).eval()
    return fp32, to_bf16(copy.deepcopy(fp32)), cast_weights(copy.deepcopy(fp32), "fp8")


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads on busy cores only wait on each other
    yield fp32_bf16_fp8()
    torch.set_num_threads(threads)


def quantised(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if hasattr(p, "scale_inv")]


def test_quantised_weights_take_about_half_of_bf16s_bytes(models):
    _, bf16, fp8 = models
    weights = quantised(fp8)
    assert {p.dtype for p in weights} == {torch.float8_e4m3fn}
    # Every Linear (kv_b_proj too), every expert weight and the embedding; not the head, eh_proj or routers.
    expected = sum(1 for m in fp8.modules() if isinstance(m, Linear))
    expected += 2 * sum(1 for m in fp8.modules() if isinstance(m, GroupedExperts)) + 1
    assert len(weights) == expected and hasattr(fp8.embed_tokens.weight, "scale_inv")
    assert fp8.lm_head.weight.dtype == torch.bfloat16
    fp8_bytes = sum(p.numel() + p.scale_inv.numel() * 4 for p in weights)
    assert fp8_bytes <= 0.55 * sum(2 * p.numel() for p in weights)
    # The whole model is smaller by exactly what those weights saved: nothing else was copied or kept.
    assert resident_bytes(bf16) - resident_bytes(fp8) == sum(2 * p.numel() for p in weights) - fp8_bytes


def test_resident_bytes_follow_from_the_shapes(models):
    fp32, bf16, fp8 = models
    assert [cast_bytes(fp32, d) for d in ("fp32", "bf16", "fp8")] == [resident_bytes(m) for m in (fp32, bf16, fp8)]
    # kv_b_proj [heads * (nope + v), rank] = [4 * 64, 64]: one byte a value and one fp32 scale per 128x128 block.
    kv_b = fp8.layers["0"].self_attn.kv_b_proj.weight
    assert tuple(kv_b.shape) == (256, 64) and kv_b.scale_inv.shape == (2, 1)
    assert fp8_bytes(kv_b.shape) == 256 * 64 + 2 * 4
    assert fp8_bytes(torch.Size([8, 512, 256])) == 8 * 512 * 256 + 8 * 4 * 2 * 4  # stacked experts


@pytest.mark.parametrize("preset,most", [("small", 0.55), ("v3-671b", 0.502)])
def test_whole_model_fp8_takes_at_most_055_of_bf16(preset, most):
    """Counted from a meta-device model's shapes; the embedding in FP8 is what brings ``small`` under 0.55
    (its head, 8.4M of 134M parameters, stays bf16)."""
    model = build_model(ModelConfig.from_preset(preset), "fp32", device="meta")
    assert 0.5 < cast_bytes(model, "fp8") / cast_bytes(model, "bf16") <= most


@settings(max_examples=25, deadline=None)
@given(vocab=st.integers(1, 300), hidden=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_fp8_embedding_rows_equal_the_dequantised_tables_rows(vocab, hidden, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = fp8_parameter(torch.randn(vocab, hidden, generator=gen) * 0.02)
    tokens = torch.randint(0, vocab, (3, 5), generator=gen)
    assert torch.equal(embedding_lookup(tokens, weight), dequantized(weight, weight.scale_inv)[tokens])


@torch.no_grad()
def test_fp8_gemms_equal_bf16_gemms_on_the_dequantised_weights(models, one_thread):
    _, bf16, fp8 = models
    rounded = copy.deepcopy(bf16)
    weights = dict(fp8.named_parameters())
    for name, p in rounded.named_parameters():
        if hasattr(weights[name], "scale_inv"):
            w = weights[name]
            mats = [dequantized(d, s) for d, s in zip(w.reshape(-1, *w.shape[-2:]), w.scale_inv.reshape(
                -1, *w.scale_inv.shape[-2:]))]
            p.copy_(torch.stack(mats).reshape(p.shape))
    tokens = torch.randint(0, CFG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = fp8(tokens).float(), rounded(tokens).float()
    assert float((a - b).norm() / b.norm()) <= 1e-2  # bf16 summation order only (experts one by one here)


@pytest.mark.parametrize("layers", [2, 4])
@torch.no_grad()
def test_fp8_logits_stay_within_the_e4m3_rounding_bound_of_bf16(layers, one_thread):
    """E4M3 keeps 3 mantissa bits: round-to-nearest leaves each weight a relative error uniform in
    ±2^-4, RMS 2^-4/√3. In y = Wx those errors add incoherently, so a GEMM's output carries about that
    relative error, and k quantised GEMMs in series about √k times it (first order). A token meets
    7 per layer (q_a, q_b, kv_a, kv_b, o_proj, gate_up, down) after the quantised embedding row, itself
    one such rounding. Dense layers: a router's top-k is discontinuous (a flipped expert is not a small
    error), which the GEMM-equality test above covers instead."""
    _, bf16, fp8 = fp32_bf16_fp8(num_hidden_layers=layers, first_k_dense_replace=layers)
    tokens = torch.randint(0, CFG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    ref = bf16(tokens).float()
    err = float((fp8(tokens).float() - ref).norm() / ref.norm())
    bound = math.sqrt(7 * layers + 1) * 2**-4 / math.sqrt(3)
    assert 1e-3 < err <= bound  # and not zero: the weights really were rounded


@pytest.mark.parametrize("attention", ["absorb", "naive"])
@torch.no_grad()
def test_fp8_cached_decode_follows_its_full_forward(attention, models, one_thread):
    """Both MLA paths over the cache with kv_b_proj in FP8: the absorbed one dequantises it into W_UK and
    W_UV, the naive one runs it as a GEMM; each step's logits match the FP8 model's own full forward up to
    bf16 rounding (a wrong dequantisation would be off by the weights' scale, not by 1e-2)."""
    fp8 = models[2]
    cfg = fp8.cfg
    w = fp8.layers["0"].self_attn.kv_b_proj.weight
    w_uk, w_uv = fp8.layers["0"].self_attn.absorbed_weights(torch.bfloat16)
    assert torch.equal(torch.cat([w_uk, w_uv], 1).reshape(w.shape), dequantized(w, w.scale_inv))
    seq = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    cache = KVCache(cfg.num_hidden_layers, cfg, 1, 12, absorb=attention == "absorb", dtype=torch.bfloat16)
    # RoPE's factors in the compute dtype, not the FP8 embedding's (E4M3 would round cos and sin by ~6 %).
    assert all(t.dtype == torch.bfloat16 for t in fp8.cached_rope(seq[:, :1], copy.deepcopy(cache)))
    full = fp8(seq).float()
    for start, end in [(0, 9), (9, 10), (10, 12)]:
        ours = fp8.lm_head(fp8.cached_hidden_states(seq[:, start:end], cache)).float()
        assert float((ours - full[:, start:end]).norm() / full[:, start:end].norm()) <= 2e-2
    out = moelib.generate(fp8, [[1, 2, 3], [4]], 4, attention=attention)
    assert out.tokens.shape == (2, 7) and out.stats["kv_bytes_per_token"] == 2 * (64 + 16) * 2


def test_load_model_fp8_generates(tmp_path, models, one_thread):
    model = moelib.load_model(write_hf(models[0], tmp_path), dtype="fp8")
    assert quantised(model) and BLOCK == (128, 128)
    out = moelib.generate(model, [[1, 2, 3]], 4)
    assert out.tokens.shape == (1, 7) and out.stats["kv_bytes_per_token"] == 2 * (64 + 16) * 2
