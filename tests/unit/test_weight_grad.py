"""Weight gradients written into ``.grad`` (moelib.precision.weight_grad): ``fresh_grads`` overwrites instead
of zeroing first, and leaves exactly the gradients of a zeroed start, through every path that writes them."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from moelib.model.embedding import embedding_lookup
from moelib.model.loss import linear_cross_entropy
from moelib.precision.backends import get_backend
from moelib.precision.weight_grad import WeightGradStore, fresh_grads

BACKENDS = ["fp32", "bf16", "fp8-emulated"]


class Block(torch.nn.Module):
    """Every kind of writer: a backend Linear, grouped experts (one of them without tokens), the fused head
    and cross-entropy, moelib's embedding lookup, autograd's own accumulation (a norm weight, an embedding),
    a weight both through the head and through autograd (tied), and a parameter that takes no part in the
    step."""

    def __init__(self, backend: str):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.backend = get_backend(backend)

        def param(*shape):
            return torch.nn.Parameter(torch.randn(*shape, generator=gen) * 0.05)

        self.embed = param(64, 128)          # autograd's embedding and, tied, the head
        self.table = param(64, 128)          # moelib's embedding lookup
        self.norm = param(128)
        self.proj = param(128, 128)
        self.experts = param(3, 128, 128)
        self.unused = param(128)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.backend.autocast("cpu"):
            h = (F.embedding(tokens, self.embed) + embedding_lookup(tokens, self.table)).flatten(0, 1) * self.norm
            h = self.backend.linear(h, self.proj, name="proj")
            counts = torch.tensor([h.shape[0] - 2, 0, 2])  # expert 1 gets no token
            h = h + self.backend.grouped_linear(h, self.experts, counts, name="experts")
            return linear_cross_entropy(h, self.embed, labels.flatten())


def grads_after(block: Block, batches, start: str, defer: bool) -> dict[str, torch.Tensor]:
    """Gradients of the batches' summed losses, from stale buffers under fresh_grads ("stale") or from zeroed
    buffers the old way ("zeroed")."""
    gen = torch.Generator().manual_seed(1)
    for p in block.parameters():  # an earlier step's leftovers
        p.grad = torch.randn(p.shape, generator=gen)
        if start == "zeroed":
            p.grad.zero_()
    WeightGradStore.clear()
    with fresh_grads(block.parameters()) if start == "stale" else contextlib.nullcontext():
        for tokens, labels in batches:
            with WeightGradStore.deferred() if defer else contextlib.nullcontext():
                block(tokens, labels).backward()
        WeightGradStore.pop_all()
    return {n: p.grad.clone() for n, p in block.named_parameters()}


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_grads_equal_a_zeroed_start(backend, defer):
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 64, (2, 5), generator=gen), torch.randint(0, 64, (2, 5), generator=gen))
               for _ in range(2)]  # two micro-batches: the first write overwrites, the second adds
    block = Block(backend)
    zeroed = grads_after(block, batches, "zeroed", defer)
    stale = grads_after(block, batches, "stale", defer)
    # Each micro-batch alone from zero, summed: the second write of a step must add to the first.
    alone = [grads_after(block, [batch], "zeroed", defer) for batch in batches]
    for name in zeroed:
        torch.testing.assert_close(stale[name], zeroed[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(stale[name], alone[0][name] + alone[1][name], rtol=1e-5, atol=1e-7, msg=name)
    assert not stale["unused"].any() and stale["experts"][1].eq(0).all() and stale["proj"].any()


def test_fresh_grads_keep_the_buffers_and_fill_missing_ones():
    block = Block("fp32")
    tokens, labels = torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (2, 5))
    with fresh_grads(block.parameters()):  # no buffers yet: made on first write, as without the block
        block(tokens, labels).backward()
    first = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    assert block.unused.grad is None and set(first) == {n for n, _ in block.named_parameters()} - {"unused"}
    buffers = {n: p.grad.data_ptr() for n, p in block.named_parameters() if p.grad is not None}
    with fresh_grads(block.parameters()):
        block(tokens, labels).backward()
    for name, p in block.named_parameters():
        if name in first:
            assert p.grad.data_ptr() == buffers[name], name  # overwritten in place, not reallocated
            torch.testing.assert_close(p.grad, first[name], rtol=0, atol=0, msg=name)


def test_a_gradient_replaced_inside_the_block_is_not_overwritten():
    """The mark belongs to the buffer: a .grad the user replaced inside the block is accumulated into."""
    w = torch.nn.Parameter(torch.ones(4))
    w.grad = torch.full((4,), 5.0)
    with fresh_grads([w]):
        w.grad = torch.full((4,), 2.0)
        (w * 3).sum().backward()
    assert torch.equal(w.grad, torch.full((4,), 5.0))


def test_the_unwritten_are_zeroed_when_the_block_fails():
    w = torch.nn.Parameter(torch.ones(4))
    w.grad = torch.full((4,), 5.0)
    with pytest.raises(RuntimeError, match="boom"), fresh_grads([w]):
        raise RuntimeError("boom")
    assert not w.grad.any()


def test_embedding_lookup_matches_autograd():
    """Rows gathered as F.embedding; dE (repeated ids included) equal to autograd's, accumulated over calls."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(10, 6, generator=gen))
    ref = weight.detach().clone().requires_grad_()
    tokens = [torch.tensor([[1, 3, 3], [0, 9, 1]]), torch.tensor([[3, 3, 3], [2, 2, 0]])]
    grads = [torch.randn(2, 3, 6, generator=gen) for _ in tokens]
    for i, (t, g) in enumerate(zip(tokens, grads)):
        out = embedding_lookup(t, weight)
        assert torch.equal(out, F.embedding(t, ref))
        out.backward(g)
        F.embedding(t, ref).backward(g)
        # From zero the same sums; added to an earlier gradient row by row instead of as one tensor.
        exact = i == 0
        torch.testing.assert_close(weight.grad, ref.grad, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)
