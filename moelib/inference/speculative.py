"""MTP self-speculative decoding (DeepSeek-V3 §5.4.3): the MTP depths, chained as in training, draft the next
D tokens from the main model's last hidden state; one main forward scores the pending token and the drafts
together; drafts are judged in order, draft i kept with probability min(1, p_i/q_i); at the first rejection a
token is drawn from norm(max(0, p_i − q_i)), and if all are kept a bonus token from the main model's next
distribution (Leviathan et al. 2023), so every token has the main model's distribution. With temperature 0
p and q are one-hot and the rule keeps a draft exactly when it is the main model's argmax: greedy output
is plain greedy's.

Depth k at position j reads depth k−1's (the main model's, for k = 1) normed output at j and the embedding of
token j + k, and predicts token j + k + 1. State between rounds, with ``seq`` the L tokens known (the last
one, x, sampled but not yet fed): the main cache holds positions [0, L − 1); depth k's cache holds the
positions whose token j + k is known (j ≤ L − 1 − k), and ``Drafter.hidden[k]`` every depth's outputs by
position. Drafting runs depth k over its positions up to L − 2, the last k − 1 of them on drafted tokens, then
rolls those back: they are recomputed once their tokens are known.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from moelib.inference.cache import KVCache
from moelib.inference.sampling import Sampler, distribution
from moelib.inference.static import StaticStep, static_length
from moelib.model.transformer import Transformer


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p − q)), the distribution to draw from after a rejection (p itself if p ≤ q everywhere,
    which a rejection cannot then happen from, except by rounding)."""
    r = (p - q).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(r.dtype).tiny), p)


class Drafter:
    """The MTP depths of ``model`` over their own caches, one per depth, for one sequence of at most
    ``length`` tokens; ``hidden[0]`` is filled by the caller with the main model's outputs."""

    def __init__(self, model: Transformer, length: int, *, absorb: bool, dtype: torch.dtype,
                 device: torch.device | str):
        cfg, depths = model.cfg, len(model.mtp)
        self.model = model
        self.caches = [KVCache(1, cfg, 1, length, absorb=absorb, dtype=dtype, device=device) for _ in range(depths)]
        self.hidden = torch.zeros(depths + 1, length, cfg.hidden_size, dtype=dtype, device=device)

    def draft(self, seq: list[int], n: int, dist: Callable[[torch.Tensor], torch.Tensor],
              sampler: Sampler) -> tuple[list[int], list[torch.Tensor]]:
        """(n drafted tokens, their distributions q [1, V]) after ``seq`` (its last token pending), from
        depths 1..n; needs the main outputs ``hidden[0]`` at positions [0, len(seq) − 1)."""
        last, ext, qs = len(seq) - 1, list(seq), []
        for k in range(1, n + 1):
            cache = self.caches[k - 1]
            start = cache.length
            tokens = torch.tensor([ext[start + k:last + k]], device=self.hidden.device)
            out = self.model.cached_mtp(k - 1, self.hidden[k - 1, start:last][None], tokens, cache)
            self.hidden[k, start:last] = out[0]
            cache.rollback(last - max(start, last + 1 - k))  # keep the positions whose token was known
            qs.append(dist(out[:, -1]))
            ext.append(int(sampler.categorical(qs[-1])[0]))
        return ext[len(seq):], qs


@torch.no_grad()
def speculative_decode(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, sampler: Sampler, *,
                       temperature: float, top_k: int, top_p: float, eos_token_id: int | None,
                       absorb: bool, stream: Callable[[torch.Tensor], None] | None = None,
                       compile: bool = False) -> tuple[torch.Tensor, dict]:
    """(new tokens [1, N], stats) for one prompt [1, T], drafting with every MTP depth the model has (fewer
    when fewer tokens remain); ``stream`` gets each token as [1, 1]. ``compile``: the verifying forwards run
    moelib.inference.static's compiled static-shape forward (the drafts stay eager)."""
    cfg, length = model.cfg, prompt.shape[1] + max_new_tokens
    device, dtype = model.embed_tokens.weight.device, model.norm.weight.dtype
    main = KVCache(cfg.num_hidden_layers, cfg, 1, static_length(length) if compile else length, absorb=absorb,
                   dtype=dtype, device=device)
    drafter = Drafter(model, length, absorb=absorb, dtype=dtype, device=device)
    verify = StaticStep(model, main) if compile else partial(model.cached_hidden_states, cache=main)

    def dist(h: torch.Tensor) -> torch.Tensor:
        return distribution(model.lm_head(h), temperature, top_k, top_p)

    seq, start = prompt[0].tolist(), prompt.shape[1]

    def append(token: int) -> bool:
        """Add a token; True when the sequence is complete."""
        seq.append(token)
        if stream is not None:
            stream(torch.tensor([[token]]))
        return len(seq) - start == max_new_tokens or token == eos_token_id

    h = model.cached_hidden_states(prompt.to(device), main)
    drafter.hidden[0, :start] = h[0]
    done = append(int(sampler.categorical(dist(h[:, -1]))[0]))
    forwards, drafted, accepted = 1, 0, 0
    while not done:
        n = min(len(model.mtp), max_new_tokens - (len(seq) - start))
        drafts, qs = drafter.draft(seq, n, dist, sampler)
        # Verify: the pending token and the drafts in one main forward; p[i] is the main model's distribution
        # of the token after the pending one and drafts[:i].
        h = verify(torch.tensor([seq[-1:] + drafts], device=device))
        drafter.hidden[0, len(seq) - 1:len(seq) + n] = h[0]
        p = dist(h[0])
        forwards, drafted = forwards + 1, drafted + n
        for i, (d, q) in enumerate(zip(drafts, qs)):
            if not bool(sampler.bernoulli((p[i, d] / q[0, d]).clamp(max=1))):
                main.rollback(n - i)  # forget the rejected draft and the ones after it
                done = append(int(sampler.categorical(residual(p[i:i + 1], q))[0]))
                break
            accepted += 1
            if append(d):
                done = True
                break
        else:  # every draft kept: a bonus token from the main model
            done = append(int(sampler.categorical(p[n:])[0]))
    new = torch.tensor([seq[start:]])
    if new.shape[1] < max_new_tokens:  # ended on eos
        new = torch.cat([new, new.new_full((1, max_new_tokens - new.shape[1]), eos_token_id)], 1)
    return new, {"main_forwards": forwards, "drafted": drafted, "accepted": accepted,
                 "kv_bytes_per_token": main.bytes_per_token()}
