"""MTP self-speculative decoding (DeepSeek-V3 §5.4.3): MTP depth 1 drafts the token after next from the main
model's last hidden state and the token just sampled; one main forward scores the pending token and the
draft together; the draft is kept with probability min(1, p/q), else a token is drawn from
norm(max(0, p − q)) (Leviathan et al. 2023), so every token has the main model's distribution. With
temperature 0 both p and q are one-hot and the rule keeps the draft exactly when it is the main model's
argmax: greedy output is plain greedy's.

State between rounds: the main cache holds positions [0, m); token m is sampled but not yet fed (pending);
the MTP cache lags, holding the positions whose next token is known, and ``hidden`` keeps the main model's
output for the positions it has not consumed yet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moelib.inference.cache import KVCache
from moelib.inference.sampling import Sampler, distribution
from moelib.model.transformer import Transformer


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p − q)), the distribution to draw from after a rejection (p itself if p ≤ q everywhere,
    which a rejection cannot then happen from, except by rounding)."""
    r = (p - q).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(r.dtype).tiny), p)


@torch.no_grad()
def speculative_decode(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, sampler: Sampler, *,
                       temperature: float, top_k: int, top_p: float, eos_token_id: int | None,
                       absorb: bool, stream: Callable[[torch.Tensor], None] | None = None) -> tuple[torch.Tensor, dict]:
    """(new tokens [1, N], stats) for one prompt [1, T], drafting with MTP depth 1; ``stream`` gets each
    token as [1, 1]."""
    cfg, length = model.cfg, prompt.shape[1] + max_new_tokens
    device, dtype = model.embed_tokens.weight.device, model.norm.weight.dtype
    main = KVCache(cfg.num_hidden_layers, cfg, 1, length, absorb=absorb, dtype=dtype, device=device)
    mtp = KVCache(1, cfg, 1, length, absorb=absorb, dtype=dtype, device=device)

    def dist(h: torch.Tensor) -> torch.Tensor:
        return distribution(model.lm_head(h), temperature, top_k, top_p)

    seq = prompt[0].tolist()

    def append(token: int) -> None:
        seq.append(token)
        if stream is not None:
            stream(torch.tensor([[token]]))

    hidden = model.cached_hidden_states(prompt.to(device), main)  # main outputs the MTP has not consumed
    x = int(sampler.categorical(dist(hidden[:, -1]))[0])
    append(x)
    forwards, drafted, accepted, start = 1, 0, 0, len(seq) - 1
    while len(seq) - start < max_new_tokens and x != eos_token_id:
        # Draft: MTP over the positions [mtp.length, main.length), each with the token after it.
        nxt = torch.tensor([seq[mtp.length + 1:main.length + 1]], device=device)
        q = dist(model.cached_mtp(0, hidden, nxt, mtp)[:, -1])
        d = int(sampler.categorical(q)[0])
        # Verify: the pending token and the draft in one main forward.
        hidden = model.cached_hidden_states(torch.tensor([[x, d]], device=device), main)
        forwards, drafted = forwards + 1, drafted + 1
        p = dist(hidden[0])  # [2, V]: the token after x, and the one after d
        if bool(sampler.bernoulli((p[0, d] / q[0, d]).clamp(max=1))):
            accepted += 1
            append(d)
            if len(seq) - start == max_new_tokens or d == eos_token_id:
                break
            x = int(sampler.categorical(p[1:])[0])
        else:
            main.rollback(1)  # forget d
            hidden = hidden[:, :1]
            x = int(sampler.categorical(residual(p[:1], q))[0])
        append(x)
    new = torch.tensor([seq[start:]])
    if new.shape[1] < max_new_tokens:  # ended on eos
        new = torch.cat([new, new.new_full((1, max_new_tokens - new.shape[1]), eos_token_id)], 1)
    return new, {"main_forwards": forwards, "drafted": drafted, "accepted": accepted,
                 "kv_bytes_per_token": main.bytes_per_token()}
