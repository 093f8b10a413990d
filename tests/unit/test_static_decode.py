"""The static-shape decode step (moelib.inference.static): the same logits as the eager cached step, compiled
or not, and the gathered experts the same as the chosen-rows path."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelib.errors import ConfigError
from moelib.inference.cache import KVCache
from moelib.inference.generate import generate
from moelib.inference.load import cast_weights
from moelib.inference.static import GatheredDispatcher, StaticStep, static_length
from moelib.model.dispatch import LocalDispatcher
from moelib.model.moe import GroupedExperts
from moelib.precision.backends import get_backend
from tests.unit.test_kv_cache import rel_err, tiny_model


@given(tokens=st.integers(1, 4), top_k=st.integers(1, 2), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
@torch.no_grad()
def test_gathered_experts_equal_the_chosen_rows_path(tokens, top_k, seed):
    gen = torch.Generator().manual_seed(seed)
    experts = GroupedExperts(8, 16, 8, get_backend("fp32"))
    for w in (experts.gate_up_proj, experts.down_proj):
        w.copy_(torch.randn(w.shape, generator=gen))
    x = torch.randn(tokens, 16, generator=gen)
    indices = torch.stack([torch.randperm(8, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    ours, counts = GatheredDispatcher().run(x, indices, weights, experts)
    ref, ref_counts = LocalDispatcher().run(x, indices, weights, experts)
    assert rel_err(ours, ref) <= 1e-6
    assert torch.equal(counts, ref_counts)


@pytest.mark.parametrize("absorb", [True, False], ids=["absorb", "naive"])
@torch.no_grad()
def test_static_step_equals_the_cached_step(absorb, one_thread):
    model = tiny_model()
    cfg = model.cfg
    pad = torch.tensor([0, 4, 1])
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, cfg.vocab_size, (3, 6 + 8), generator=gen)
    eager, static = (KVCache(cfg.num_hidden_layers, cfg, 3, 20, pad=pad, absorb=absorb) for _ in range(2))
    model.cached_hidden_states(tokens[:, :6], eager)
    model.cached_hidden_states(tokens[:, :6], static)
    step = StaticStep(model, static, compile=False)
    end = 6
    for t in [1, 2, 1, 3, 1]:  # one token, or a few as a verification does
        ref = model.lm_head(model.cached_hidden_states(tokens[:, end:end + t], eager))
        ours = model.lm_head(step(tokens[:, end:end + t]))
        end += t
        for b in range(3):  # padding slots' outputs are discarded, so compare the real ones
            assert rel_err(ours[b], ref[b]) <= 1e-5
    assert static.length == eager.length == end


@pytest.mark.slow  # inductor compiles the 2-layer steps: ~30-60 s of CPU (2-6 min wall on the loaded 2-core VM)
@torch.no_grad()
def test_compiled_decode_equals_eager_decode(one_thread):
    model = tiny_model()
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
               for n in (7, 3)]
    eager = generate(model, prompts, 12)
    compiled = generate(model, prompts, 12, compile=True)
    assert torch.equal(compiled.tokens, eager.tokens)
    assert len(model.mtp)  # the verify forwards compiled too: greedy speculative is plain greedy
    assert torch.equal(generate(model, prompts, 12, speculative="mtp", compile=True).tokens, eager.tokens)
    # The compiled step's logits, step by step, against the eager step's.
    cfg = model.cfg
    slots = static_length(19)  # what generate(compile=True) allocated: its compiled step is reused
    ref_cache, cache = (KVCache(cfg.num_hidden_layers, cfg, 2, slots, pad=torch.tensor([0, 4])) for _ in range(2))
    model.cached_hidden_states(eager.tokens[:, :7], ref_cache)
    model.cached_hidden_states(eager.tokens[:, :7], cache)
    step = StaticStep(model, cache)
    for i in range(7, 19):
        ref = model.lm_head(model.cached_hidden_states(eager.tokens[:, i:i + 1], ref_cache))
        assert rel_err(model.lm_head(step(eager.tokens[:, i:i + 1])), ref) <= 1e-5


def test_compile_with_fp8_resident_weights_raises_naming_it():
    model = cast_weights(tiny_model(), "fp8")
    with pytest.raises(ConfigError, match=r"compile=True \(--compile\)"):
        generate(model, [[1, 2, 3]], 2, compile=True)
