"""Inference runs on plain torch ops: with autograd off, no training autograd Function runs (Linear, grouped
Linear, RMSNorm, the recomputing SwiGLU/norm/Linear, the slot sum), a decode step reads nothing back to the
host but the experts that got rows, and the outputs are those of the autograd path."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moelib import ModelConfig
from moelib.inference.cache import KVCache
from moelib.model import build_model, recompute
from moelib.model.norm import _RMSNorm, _RMSNormInputAgain
from moelib.precision import grouped, rows

TINY = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, first_k_dense_replace=1, intermediate_size=96,
            num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
            moe_intermediate_size=32, init_std=0.1, max_position_embeddings=64)
TRAINING_FUNCTIONS = (grouped._Linear, grouped._GroupedLinear, _RMSNorm, _RMSNormInputAgain,
                      recompute._RecomputedSwiGLU, recompute._LinearInputAgain, rows._SumSlots)


def refuse(*args, **kwargs):
    raise AssertionError("a training autograd Function ran under torch.no_grad()")


class HostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (item(), int(t), bool(t))."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_grad_forward_uses_plain_ops_and_equals_the_autograd_forward(dtype, one_thread):
    model = build_model(ModelConfig.from_preset("tiny", **TINY), "fp32", seed=0).to(dtype)
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    reference = model(tokens).detach()  # autograd on: the training path
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for fn in TRAINING_FUNCTIONS:
            stack.enter_context(mock.patch.multiple(fn, apply=refuse))
        plain = model(tokens)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(plain.float(), reference.float(), rtol=tol, atol=tol)


@torch.no_grad()
def test_a_decode_step_reads_back_only_which_experts_got_rows(one_thread):
    model = build_model(ModelConfig.from_preset("tiny", **TINY), "fp32", seed=0).eval()
    cache = KVCache(model.cfg.num_hidden_layers, model.cfg, 2, 16, pad=torch.tensor([0, 3]))
    model.cached_hidden_states(torch.randint(0, 64, (2, 6)), cache)
    reads = HostReads()
    with reads, mock.patch.object(grouped, "_forward_mm", wraps=grouped._forward_mm) as grouped_gemms:
        model.cached_hidden_states(torch.randint(0, 64, (2, 1)), cache, checked=True)
    # Each of the one MoE layer's two grouped GEMMs lists its row counts (Tensor.tolist, not an aten op);
    # nothing else comes back to the host: no range check of the ids, no position check on the device.
    assert grouped_gemms.call_count == 2 and reads.count == 0
