"""MTP self-speculative decoding with 1-3 chained depths: greedy equals plain greedy; the cached chain drafts
as the uncached one; sampled, the output distribution is exactly the main model's (every branch of the
procedure enumerated on an 8-token vocabulary)."""

import copy
import math

import pytest
import torch
from test_kv_cache import rel_err, tiny_model

import moelib
from moelib.inference import speculative
from moelib.inference.sampling import Sampler, distribution
from moelib.inference.speculative import Drafter, speculative_decode


def trained_model(depths: int) -> torch.nn.Module:
    """Mildly trained (8 AdamW steps) on sequences where each token's successor is fixed (t -> 3t + 1 mod 8):
    the main model and the MTP depths mostly agree, so rounds keep none, some or all of their drafts."""
    torch.manual_seed(0)
    model = tiny_model(vocab_size=8, num_hidden_layers=1, first_k_dense_replace=1,
                       num_nextn_predict_layers=depths).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(8):
        t = [torch.randint(0, 8, (8,))]
        for _ in range(12):
            t.append((3 * t[-1] + 1) % 8)
        t = torch.stack(t, 1)
        opt.zero_grad()
        model.compute_loss(t[:, :-1], t[:, 1:], mtp_weight=1.0).loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield trained_model(3)
    torch.set_num_threads(threads)


def first_depths(model, depths: int):
    """``model`` with only its first ``depths`` MTP modules (a model trained with D depths drafts with D)."""
    model = copy.deepcopy(model)
    del model.mtp[depths:]
    return model


@pytest.mark.parametrize("depths", [1, 2, 3])
@pytest.mark.parametrize("weights", ["random", "trained"])
@torch.no_grad()
def test_mtp_greedy_equals_plain_greedy(depths, weights, trained, one_thread):
    if weights == "random":  # a small vocabulary, so drafts are both accepted and rejected
        model = tiny_model(vocab_size=8, num_nextn_predict_layers=depths)
    else:
        model = first_depths(trained, depths)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 8, (n,), generator=gen).tolist() for n in (4, 11, 1)]
    plain = moelib.generate(model, prompts, 24)
    spec = moelib.generate(model, prompts, 24, speculative="mtp")
    assert torch.equal(spec.tokens, plain.tokens)
    s, rounds, tokens = spec.stats, spec.stats["main_forwards"] - len(prompts), len(prompts) * 24
    # A round (a verify forward) adds its kept drafts and one more token, except a last round that keeps all
    # its drafts and fills the request; each prompt's prefill adds its first token.
    assert tokens - len(prompts) - rounds <= s["accepted"] <= tokens - rounds
    assert rounds <= s["drafted"] <= depths * rounds and s["acceptance_rate"] == s["accepted"] / s["drafted"]
    if weights == "random":
        assert 0 < s["accepted"] < s["drafted"]
    else:  # the chain drafts well: a verify forward yields more than D tokens on average
        assert s["acceptance_rate"] > 0.75 and rounds < tokens / depths


class RecordingDrafter(Drafter):
    """A Drafter that keeps what each round saw and drafted."""

    rounds: list = []

    def draft(self, seq, n, dist, sampler):
        drafts, qs = super().draft(seq, n, dist, sampler)
        self.rounds.append((list(seq), drafts, torch.cat(qs)))
        return drafts, qs


@pytest.mark.parametrize("absorb", [True, False], ids=["absorb", "naive"])
@torch.no_grad()
def test_cached_mtp_chain_drafts_as_the_uncached_chain(absorb, trained, monkeypatch, one_thread):
    """Each round's draft distributions equal the training chain run over the whole sequence without a cache
    (depth k at position j: depth k-1's output there and token j + k), however many drafts the rounds
    before kept: the depths' caches roll back exactly the positions that read a drafted token. The stats
    count what the rounds did."""
    model = trained
    monkeypatch.setattr(speculative, "Drafter", RecordingDrafter)
    RecordingDrafter.rounds = []
    prompt = [3, 1, 4, 1, 5]
    new, stats = speculative_decode(model, torch.tensor([prompt]), 30, Sampler(1), temperature=1.0, top_k=0,
                                    top_p=1.0, eos_token_id=None, absorb=absorb)
    rounds, out = RecordingDrafter.rounds, prompt + new[0].tolist()
    kept = [next((i for i, d in enumerate(drafts) if out[len(seq) + i] != d), len(drafts))
            for seq, drafts, _ in rounds]
    assert sorted(set(kept)) == [0, 1, 2, 3]  # rounds kept none, some and all of their drafts
    assert stats["accepted"] == sum(kept) and stats["drafted"] == sum(len(d) for _, d, _ in rounds)
    assert stats["main_forwards"] == 1 + len(rounds)
    for seq, drafts, qs in rounds:
        ext = torch.tensor([seq + drafts])
        last = len(seq) - 1
        cos, sin = model.rope(last, ext.device)
        h = model.hidden_states(ext[:, :last])
        for k, q in enumerate(qs, start=1):
            h = model.mtp[k - 1](h, model.embed(ext[:, k:last + k]), cos, sin)
            assert rel_err(q, distribution(model.lm_head(h[0, -1]), 1.0)) <= 1e-5


class BranchSampler:
    """Follows a script of branch choices (then the first branch) and records each choice's probability and
    how many branches it had, so that a depth-first walk visits every outcome of a procedure once."""

    def __init__(self, script: list[int]):
        self.script, self.widths, self.prob = script, [], 1.0

    def _choose(self, options: list[tuple[object, float]]):
        options = [(v, p) for v, p in options if p > 0]
        i = len(self.widths)
        k = self.script[i] if i < len(self.script) else 0
        self.widths.append(len(options))
        value, p = options[k]
        self.prob *= p
        return value

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self._choose([(v, float(p)) for v, p in enumerate(probs[0].double())])])

    def bernoulli(self, p: torch.Tensor) -> torch.Tensor:
        a = float(p)
        return torch.tensor(self._choose([(True, a), (False, 1 - a)]))


def exact_distribution(run) -> dict[tuple[int, ...], float]:
    """{outcome: probability} of run(sampler), every branch walked."""
    dist, script = {}, []
    while True:
        sampler = BranchSampler(script)
        out = tuple(run(sampler))
        dist[out] = dist.get(out, 0.0) + sampler.prob
        script = script + [0] * (len(sampler.widths) - len(script))
        while script and script[-1] + 1 >= sampler.widths[len(script) - 1]:
            script.pop()
        if not script:
            return dist
        script[-1] += 1


def main_model_distribution(model, prompt: list[int], n: int, **sampling) -> dict[tuple[int, ...], float]:
    """{continuation: probability} of sampling n tokens from the main model, from full forwards."""
    if n == 0:
        return {(): 1.0}
    p = distribution(model(torch.tensor([prompt]))[0, -1], **sampling).double()
    return {(t, *rest): float(p[t]) * q for t in range(len(p)) if p[t] > 0
            for rest, q in main_model_distribution(model, prompt + [t], n - 1, **sampling).items()}


@pytest.mark.parametrize("depths,new,sampling", [(1, 2, dict(temperature=1.0)),
                                                 (1, 3, dict(temperature=0.7, top_k=3, top_p=0.9)),
                                                 (2, 4, dict(temperature=1.0, top_k=2))],
                         ids=["depth-1-2-tokens", "depth-1-3-tokens-top-k-top-p", "depths-2-4-tokens-top-k"])
@torch.no_grad()
def test_mtp_sampling_has_the_main_models_distribution(depths, new, sampling, one_thread):
    model = tiny_model(vocab_size=8, num_hidden_layers=1, first_k_dense_replace=1, init_std=0.3,
                       num_nextn_predict_layers=depths)
    prompt = [3, 1, 4, 1, 5]
    sampling = {"top_k": 0, "top_p": 1.0, **sampling}

    def run(sampler):
        tokens, _ = speculative_decode(model, torch.tensor([prompt]), new, sampler, eos_token_id=None, absorb=True,
                                       **sampling)
        return tokens[0].tolist()

    ours, theirs = exact_distribution(run), main_model_distribution(model, prompt, new, **sampling)
    assert math.isclose(sum(ours.values()), 1.0, abs_tol=1e-6)  # fp32 probabilities
    assert max(abs(ours.get(k, 0.0) - theirs.get(k, 0.0)) for k in ours.keys() | theirs.keys()) <= 1e-5
    # The draft model really differs from the main one, so the rule has something to correct.
    assert len(ours) > 1
