"""dtype="fp8": E4M3 weights with 128x128 block scales stay resident; GEMMs dequantise them per block."""

import copy
import math

import pytest
import torch
from _hf import write_hf

import moelib
from moelib import ModelConfig
from moelib.inference.fp8_weights import BLOCK, dequantized, resident_bytes
from moelib.inference.load import cast_weights, to_bf16
from moelib.model import build_model
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
    # Every Linear but kv_b_proj, and every expert weight.
    expected = sum(1 for n, m in fp8.named_modules() if isinstance(m, Linear) and not n.endswith("kv_b_proj"))
    expected += 2 * sum(1 for m in fp8.modules() if isinstance(m, GroupedExperts))
    assert len(weights) == expected
    fp8_bytes = sum(p.numel() + p.scale_inv.numel() * 4 for p in weights)
    assert fp8_bytes <= 0.55 * sum(2 * p.numel() for p in weights)
    # The whole model is smaller by exactly what those weights saved: nothing else was copied or kept.
    assert resident_bytes(bf16) - resident_bytes(fp8) == sum(2 * p.numel() for p in weights) - fp8_bytes


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
    6 per layer (q_a, q_b, kv_a, o_proj, gate_up, down). Dense layers: a router's top-k is discontinuous
    (a flipped expert is not a small error), which the GEMM-equality test above covers instead."""
    _, bf16, fp8 = fp32_bf16_fp8(num_hidden_layers=layers, first_k_dense_replace=layers)
    tokens = torch.randint(0, CFG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    ref = bf16(tokens).float()
    err = float((fp8(tokens).float() - ref).norm() / ref.norm())
    bound = math.sqrt(6 * layers) * 2**-4 / math.sqrt(3)
    assert 1e-3 < err <= bound  # and not zero: the weights really were rounded


def test_load_model_fp8_generates(tmp_path, models, one_thread):
    model = moelib.load_model(write_hf(models[0], tmp_path), dtype="fp8")
    assert quantised(model) and BLOCK == (128, 128)
    out = moelib.generate(model, [[1, 2, 3]], 4)
    assert out.tokens.shape == (1, 7) and out.stats["kv_bytes_per_token"] == 2 * (64 + 16) * 2
