"""The MLA KV cache: per layer only the normalised latent c_kv (kv_lora_rank) and the rotated RoPE key k_pe
(qk_rope_head_dim), side by side in one row per token, written at each sequence's next slots.

Prompts of unequal length are left-padded: sequence b's first ``pad[b]`` slots hold padding that no real
query sees, and its real tokens sit at positions 0, 1, ... (slot − pad[b]), so every sequence is computed
exactly as it would be alone. A forward is ``begin(T)`` (positions of the new tokens), each layer's
``layer(i).update(...)``, then ``commit()``; ``rollback(n)`` forgets the last n slots (rejected drafts).
"""

from __future__ import annotations

import torch

from moelib.config import ModelConfig


def visibility(slots: torch.Tensor, keys: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, t, S] to add to the scores: 0 where a query sees the key, -inf where not; positions [B, t])
    for new tokens at cache ``slots`` [t] over the cache slots ``keys`` [S] of sequences left-padded by ``pad`` [B]."""
    causal = keys[None, :] <= slots[:, None]                                  # [t, S]
    real_key = keys[None, :] >= pad[:, None]                                  # [B, S]
    # A padding query sees itself only, so its (discarded) row stays finite.
    visible = causal & (real_key[:, None, :] | (keys[None, :] == slots[:, None]))
    mask = torch.zeros(visible.shape, device=pad.device).masked_fill_(~visible, float("-inf"))
    return mask, (slots[None, :] - pad[:, None]).clamp(min=0)


class KVCache:
    def __init__(self, num_layers: int, cfg: ModelConfig, batch: int, max_len: int, *, pad: torch.Tensor | None = None,
                 absorb: bool = True, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        # One row [c_kv; k_pe] per token, as the absorbed path's scores read them (one GEMM for both parts).
        self.latent = torch.zeros(num_layers, batch, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                  dtype=dtype, device=device)
        self.rank = cfg.kv_lora_rank
        self.pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device)
        self.min_pad = int(self.pad.min()) if batch else 0  # on the host: positions are checked without a sync
        self.absorb = absorb
        self.length = 0      # slots filled (the same for every sequence)
        self._new = 0        # tokens of the forward in progress
        self.mask: torch.Tensor | None = None  # [B, t, S] to add to the scores: 0 where seen, -inf where not

    @property
    def max_len(self) -> int:
        return self.latent.shape[2]

    def bytes_per_token(self) -> int:
        """Cache bytes one token of one sequence takes, summed over layers."""
        return self.latent.shape[0] * self.latent.shape[3] * self.latent.element_size()

    def last_position(self, t: int) -> int:
        """The largest position the next t tokens take (of the sequence with the least padding)."""
        return self.length + t - 1 - self.min_pad

    def begin(self, t: int) -> torch.Tensor:
        """Positions [B, t] of the next t tokens; also sets the mask the layers' ``update`` returns."""
        if self.length + t > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} slots; {self.length} used, {t} more asked for")
        self._new = t
        slots = torch.arange(self.length, self.length + t, device=self.pad.device)
        self.mask, positions = visibility(slots, torch.arange(self.length + t, device=self.pad.device), self.pad)
        return positions

    def layer(self, i: int) -> _LayerCache:
        return _LayerCache(self, i)

    def commit(self) -> None:
        self.length += self._new
        self._new = 0

    def rollback(self, n: int) -> None:
        """Forget the last n slots (their contents are overwritten by the next forward)."""
        self.length -= n


class _LayerCache:
    """Layer i's view of a KVCache, the object MLA.forward takes."""

    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i
        self.absorb = cache.absorb
        self.rank = cache.rank

    def update(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' c_kv [B, T, rank] and k_pe [B, T, rope]; return every cached token's
        [c_kv; k_pe] [B, S, rank + rope] and the mask [B, T, S] to add to the scores (0 where a query sees
        the key, -inf where not)."""
        c, start = self.cache, self.cache.length
        rows = c.latent[self.i, :, start:start + c._new]
        rows[..., :self.rank] = c_kv
        rows[..., self.rank:] = k_pe
        return c.latent[self.i, :, :start + c._new], c.mask
