"""Tensors kept between steps (moelib.precision.kept): handed out again only when nobody else holds them, and
training with them is bit-identical to fresh allocations, a retained graph included."""

import gc

import pytest
import torch

from moelib import ModelConfig, TrainConfig
from moelib.model import build_model
from moelib.precision import kept, weight_cache
from moelib.train.trainer import Trainer

CFG = ModelConfig.from_preset("tiny", num_hidden_layers=2, vocab_size=300, hidden_size=64, intermediate_size=96,
                              moe_intermediate_size=32, n_routed_experts=8, n_group=4, topk_group=2,
                              num_experts_per_tok=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                              qk_rope_head_dim=16, v_head_dim=16, num_attention_heads=2)


def ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Save(torch.autograd.Function):
    """y = x * c, saving c as a Linear saves its cast weight."""

    @staticmethod
    def forward(ctx, x, c):
        ctx.save_for_backward(c)
        return x * c

    @staticmethod
    def backward(ctx, grad):
        (c,) = ctx.saved_tensors
        return grad * c, None


@pytest.fixture(autouse=True)
def _fresh_pools():
    kept.release()
    yield
    kept.release()


def test_outside_keep_every_tensor_is_new():
    owner = torch.zeros(1)
    kept.empty(owner, "x", (64, 64), torch.float32)
    with kept.keep():
        pass
    b = kept.empty(owner, "x", (64, 64), torch.float32)
    assert owner not in kept._kept and b.shape == (64, 64)


def test_handed_out_again_only_when_nobody_holds_it():
    owner = torch.zeros(1)
    with kept.keep():
        a = kept.empty(owner, "x", (256, 256), torch.bfloat16)
        b = kept.empty(owner, "x", (256, 256), torch.bfloat16)
        assert ptr(a) != ptr(b)  # a is still named
        addr_a = ptr(a)
        del a
        c = kept.empty(owner, "x", (256, 256), torch.bfloat16)
        assert ptr(c) == addr_a
        view = c[1:]
        del c
        assert ptr(kept.empty(owner, "x", (256, 256), torch.bfloat16)) != addr_a  # a view is alive
        del view
        assert ptr(kept.empty(owner, "x", (256, 256), torch.bfloat16)) == addr_a
        # Another size, dtype or kind is another tensor.
        assert ptr(kept.empty(owner, "x", (256, 128), torch.bfloat16)) != addr_a
        assert ptr(kept.empty(owner, "x", (256, 256), torch.float32)) != addr_a
        assert ptr(kept.empty(owner, "y", (256, 256), torch.bfloat16)) != addr_a


def test_not_handed_out_while_a_graph_saved_it():
    owner = torch.zeros(1)
    x = torch.randn(8, requires_grad=True)
    with kept.keep():
        c = kept.empty(owner, "x", (8,), torch.float32).fill_(2.0)
        addr = ptr(c)
        y = _Save.apply(x, c)
        del c
        assert ptr(kept.empty(owner, "x", (8,), torch.float32)) != addr
        y.sum().backward()
        del y  # the graph is gone
        assert ptr(kept.empty(owner, "x", (8,), torch.float32)) == addr
    assert torch.equal(x.grad, torch.full((8,), 2.0))


def test_at_most_a_few_per_kind_and_gone_with_their_owner():
    owner = torch.zeros(1)
    with kept.keep():
        held = [kept.empty(owner, "x", (16,), torch.float32) for _ in range(kept._MAX_PER_KIND + 3)]
    assert len(kept._kept[owner][("x", (16,), torch.float32)]) == kept._MAX_PER_KIND
    del held, owner
    gc.collect()
    assert len(kept._kept) == 0


def test_not_kept_off_the_cpu():
    owner = torch.zeros(1, device="meta")
    with kept.keep():
        t = kept.empty(owner, "x", (4,), torch.float32)
    assert t.device.type == "meta" and len(kept._kept) == 0


def _fresh_allocations(monkeypatch):
    monkeypatch.setattr(kept, "empty", lambda owner, kind, shape, dtype: torch.empty(shape, dtype=dtype,
                                                                                         device=owner.device))


@pytest.mark.parametrize("backend", ["bf16", "fp32"])
def test_training_is_bit_identical_to_fresh_allocations(backend, monkeypatch):
    seq = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(lr=1e-2, min_lr=1e-3, lr_warmup_iters=0, precision={"backend": backend})

    def run():
        trainer = Trainer(CFG, cfg, model=build_model(CFG, backend, seed=0))
        losses = [trainer.train_step(seq[:, :-1], seq[:, 1:]).loss for _ in range(4)]
        kinds = {k[0] for per in kept._kept.values() for k in per}
        return losses, [p.detach().clone() for p in trainer.model.parameters()], kinds

    with_kept, weights, kinds = run()
    assert kinds == ({"cast", "logits"} if backend == "bf16" else {"logits"})
    _fresh_allocations(monkeypatch)
    fresh, fresh_weights, _ = run()
    assert with_kept == fresh
    assert all(torch.equal(a, b) for a, b in zip(weights, fresh_weights))


def test_a_retained_graph_keeps_its_tensors(monkeypatch):
    """Step 1's graph, retained, is backpropagated after step 2 ran: its cast weights and logits must not
    have been written over by step 2."""
    seq = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(4))
    other = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(5))

    def grads_of_first_step():
        model = build_model(CFG, "bf16", seed=0).train()
        with weight_cache.reuse(), torch.autocast("cpu", dtype=torch.bfloat16):
            first = model.compute_loss(seq[:, :-1], seq[:, 1:], 0.3).loss
        for p in model.parameters():
            p.data = p.data + 0.01  # new weights (as an optimizer step), so new casts; no version bump
        with weight_cache.reuse():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                second = model.compute_loss(other[:, :-1], other[:, 1:], 0.3).loss
            second.backward()
        model.zero_grad()
        first.backward()
        return [p.grad.clone() for p in model.parameters()]

    with_kept = grads_of_first_step()
    _fresh_allocations(monkeypatch)
    fresh = grads_of_first_step()
    assert all(torch.equal(a, b) for a, b in zip(with_kept, fresh))

