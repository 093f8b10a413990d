"""Next-token distributions (temperature, top-k, top-p) and the random draws generation makes.

Every random choice goes through a ``Sampler`` (a categorical draw or a coin flip), so a test can replace it
with one that walks every branch and computes a procedure's exact output distribution.
"""

from __future__ import annotations

import torch

from moelib.errors import ConfigError


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0:
        raise ConfigError(f"temperature (--temperature) must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p (--top-p) must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ConfigError(f"top_k (--top-k) must be >= 0 (0 keeps every token), got {top_k}")


def distribution(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities [..., V] in fp32: one-hot on the argmax when temperature is 0 (greedy); otherwise
    softmax(logits / temperature) restricted to the top_k most likely tokens (0: all) and to the smallest
    set whose mass reaches top_p, renormalised."""
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p (the most likely one always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


class Sampler:
    """The random draws of one generation, from its own generator (``seed``; None: from torch's)."""

    def __init__(self, seed: int | None = None, device: torch.device | str = "cpu"):
        self.gen = torch.Generator(device)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        self.gen.manual_seed(seed)

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of probs [B, V], as a LongTensor [B]."""
        return torch.multinomial(probs, 1, generator=self.gen).squeeze(-1)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The greedy token of each row of logits [B, V], as a LongTensor [B]: what ``categorical`` draws
        from the one-hot ``distribution`` at temperature 0, without the draw."""
        return logits.argmax(-1)

    def bernoulli(self, p: torch.Tensor) -> torch.Tensor:
        """True with probability p (elementwise; p = 1 always, p = 0 never)."""
        return torch.rand(p.shape, generator=self.gen, device=p.device) < p
