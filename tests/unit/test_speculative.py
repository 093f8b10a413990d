"""MTP self-speculative decoding: greedy equals plain greedy; sampled, its output distribution is exactly the
main model's (every branch of the procedure enumerated on an 8-token vocabulary)."""

import math

import pytest
import torch
from test_kv_cache import tiny_model

import moelib
from moelib.inference.sampling import distribution
from moelib.inference.speculative import speculative_decode


@torch.no_grad()
def test_mtp_greedy_equals_plain_greedy(one_thread):
    model = tiny_model(vocab_size=8)  # a small vocabulary, so drafts are both accepted and rejected
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 8, (n,), generator=gen).tolist() for n in (4, 11, 1)]
    plain = moelib.generate(model, prompts, 24)
    spec = moelib.generate(model, prompts, 24, speculative="mtp")
    assert torch.equal(spec.tokens, plain.tokens)
    s = spec.stats
    assert 0 < s["accepted"] < s["drafted"]
    assert s["main_forwards"] == len(prompts) + s["drafted"]  # a prefill per prompt, then one verify per draft
    assert s["acceptance_rate"] == s["accepted"] / s["drafted"]


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


@pytest.mark.parametrize("new,sampling", [(2, dict(temperature=1.0)),
                                          (3, dict(temperature=0.7, top_k=3, top_p=0.9))],
                         ids=["2-tokens", "3-tokens-top-k-top-p"])
@torch.no_grad()
def test_mtp_sampling_has_the_main_models_distribution(new, sampling, one_thread):
    model = tiny_model(vocab_size=8, num_hidden_layers=1, first_k_dense_replace=1, init_std=0.3)
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
