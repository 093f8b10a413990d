"""The DeepSeek-V3 decoder: embedding, an ordered stack of layers, final norm, head, MTP modules.

Layers live in a ModuleDict keyed by their global index, so a pipeline stage can drop the layers it
does not own (and the embedding, norm or head) while every parameter keeps its global name.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moelib.config import ModelConfig, PrecisionConfig
from moelib.errors import DataError
from moelib.model.embedding import embedding_lookup
from moelib.model.loss import IGNORE_INDEX, linear_cross_entropy
from moelib.model.mla import MLA
from moelib.model.mlp import MLP
from moelib.model.moe import MoE
from moelib.model.norm import RMSNorm
from moelib.model.recompute import checkpoint, should_recompute
from moelib.model.rope import rope_attention_factor, rope_cos_sin, rope_inv_freq, rope_tables
from moelib.precision.backends import Backend, get_backend


class DecoderLayer(nn.Module):
    # Set by moelib.train.recompute.apply_recompute ("full"): keep only the input, rerun the layer in backward.
    recompute_layer = False

    def __init__(self, cfg: ModelConfig, layer_id: int, backend: Backend):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, backend) if cfg.is_moe_layer(layer_id) else MLP(
            cfg.hidden_size, cfg.intermediate_size, backend)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        """``cache``: this layer's view of an inference KV cache (see moelib.model.mla)."""
        if should_recompute(self.recompute_layer):
            return checkpoint(self.forward, x, cos, sin)
        h, normed, again = self.attention(x, cos, sin, cache)
        return h + self.mlp(normed, again)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                  ) -> tuple[torch.Tensor, torch.Tensor, Callable[[], torch.Tensor] | None]:
        """The first residual block h = x + attention, and the MLP's input: (h, the post-attention norm of h,
        its recomputation or None; see RMSNorm.forward_again). The pipeline's overlapped schedule calls this
        on its own and runs the MoE half in pieces."""
        if should_recompute(self.recompute_layer):  # only that schedule gets here: rerun attention whole
            h = checkpoint(self._residual, x, cos, sin)
            return h, *self.post_attention_layernorm.forward_again(h)
        attn, attn_again = self.self_attn.forward_again(self.input_layernorm(x), cos, sin, cache)
        h = x + attn
        # The residual h need not be kept when attention's output can be recomputed (x is kept by the input
        # norm anyway): the post-attention norm keeps this instead, and the MLP (router, gate and up
        # projections) the norm's recomputation.
        h_again = None if attn_again is None else (lambda: x + attn_again())
        return h, *self.post_attention_layernorm.forward_again(h, h_again)

    def _residual(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x + self.self_attn(self.input_layernorm(x), cos, sin)


class MTPModule(nn.Module):
    """Multi-token prediction depth k: h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]), one
    decoder block, then its own norm (``shared_head.norm`` in the release). The normed output feeds
    the shared head and the next depth, as in Megatron-Core and transformers' MtpModel."""

    def __init__(self, cfg: ModelConfig, layer_id: int, backend: Backend):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # High precision in V3 (the FP8 release leaves eh_proj unquantised).
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layer = DecoderLayer(cfg, layer_id, backend)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache=None) -> torch.Tensor:
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return self.norm(self.layer(h, cos, sin, cache))


@dataclass
class LossOutput:
    loss: torch.Tensor                  # what backward() is called on
    lm_loss: torch.Tensor               # main next-token cross-entropy
    mtp_losses: list[torch.Tensor] = field(default_factory=list)


def shift_left(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x[:, i + k] at position i, ``fill`` where i + k runs past the sequence."""
    if k == 0:
        return x
    return torch.cat([x[:, k:], x.new_full((x.shape[0], min(k, x.shape[1])), fill)], dim=1)[:, : x.shape[1]]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: Backend):
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        # Embedding and head stay in high precision (V3).
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, backend) for i in range(cfg.num_hidden_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k, backend)
                                 for k in range(cfg.num_nextn_predict_layers))
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.rope_factor = rope_attention_factor(cfg)

    # -- pieces a pipeline stage can call -----------------------------------------------------------

    def rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.cfg.max_position_embeddings:
            raise DataError(f"sequence length {seq_len} exceeds ModelConfig.max_position_embeddings "
                            f"({self.cfg.max_position_embeddings})")
        return rope_cos_sin(self.inv_freq.to(device), torch.arange(seq_len, device=device), self.rope_factor)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        check_token_ids(tokens, self.cfg.vocab_size)
        return embedding_lookup(tokens, self.embed_tokens.weight)

    def decoder(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return h

    # -- whole-model entry points -------------------------------------------------------------------

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Main-model output after the final norm, [B, T, hidden]."""
        cos, sin = self.rope(tokens.shape[1], tokens.device)
        return self.norm(self.decoder(self.embed(tokens), cos, sin))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Main-model logits [B, T, vocab] for token ids [B, T]."""
        return self.lm_head(self.hidden_states(tokens))

    def compute_loss(self, tokens: torch.Tensor, labels: torch.Tensor, mtp_weight: float = 0.3) -> LossOutput:
        """Cross-entropy of the main model plus (lambda / D) * sum_k CE_k of the MTP depths.

        labels[:, i] is the token after tokens[:, i] (IGNORE_INDEX to skip a position). MTP depth k at
        position i reads token i + k (= labels[:, i + k - 1]) and predicts labels[:, i + k]. With
        mtp_weight 0 the MTP modules are not run.
        """
        if labels.shape != tokens.shape:
            raise DataError(f"labels shape {tuple(labels.shape)} differs from tokens shape {tuple(tokens.shape)}")
        cos, sin = self.rope(tokens.shape[1], tokens.device)
        return self.head_loss(self.decoder(self.embed(tokens), cos, sin), labels, mtp_weight, cos, sin)

    def head_loss(self, h: torch.Tensor, labels: torch.Tensor, mtp_weight: float, cos: torch.Tensor,
                  sin: torch.Tensor, embedding: nn.Embedding | None = None) -> LossOutput:
        """The losses from the last decoder layer's output: final norm, head, MTP depths. A pipeline's last
        stage passes the embedding it shares with the first stage."""
        emb = embedding if embedding is not None else self.embed_tokens
        h = self.norm(h)
        lm_loss = linear_cross_entropy(h, self.lm_head.weight, labels)
        mtp_losses = []
        for k, module in enumerate(self.mtp if mtp_weight > 0 else (), start=1):
            next_tokens = shift_left(labels, k - 1, 0).clamp(min=0)
            h = module(h, embedding_lookup(next_tokens, emb.weight), cos, sin)
            mtp_losses.append(linear_cross_entropy(h, self.lm_head.weight, shift_left(labels, k, IGNORE_INDEX)))
        loss = lm_loss
        if mtp_losses:
            loss = loss + mtp_weight / len(mtp_losses) * torch.stack(mtp_losses).sum()
        return LossOutput(loss, lm_loss, mtp_losses)

    # -- inference over a KV cache (moelib.inference.cache) ------------------------------------------

    def cached_rope(self, tokens: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation factors (rope_tables) [B, T, 1, rope] at each sequence's next positions in ``cache``,
        built once for all layers, in the compute dtype of the weights (as each layer would round them): the
        final norm's, since an FP8-resident embedding's dtype is E4M3's."""
        last = cache.last_position(tokens.shape[1])
        if last >= self.cfg.max_position_embeddings:
            raise DataError(f"position {last} reaches ModelConfig.max_position_embeddings "
                            f"({self.cfg.max_position_embeddings})")
        cos, sin = rope_cos_sin(self.inv_freq.to(tokens.device), cache.begin(tokens.shape[1]), self.rope_factor)
        return tuple(t.to(self.norm.weight.dtype) for t in rope_tables(cos, sin))

    def cached_hidden_states(self, tokens: torch.Tensor, cache, *, checked: bool = False) -> torch.Tensor:
        """Main-model output after the final norm [B, T, hidden] for ``tokens`` appended to ``cache``.
        ``checked``: the ids are known to lie in the vocabulary (drawn from the head), so the range check and
        its reads back to the host are skipped."""
        cos, sin = self.cached_rope(tokens, cache)
        h = embedding_lookup(tokens, self.embed_tokens.weight) if checked else self.embed(tokens)
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, cos, sin, cache.layer(i))
        cache.commit()
        return self.norm(h)

    def cached_mtp(self, depth: int, h_prev: torch.Tensor, next_tokens: torch.Tensor, cache) -> torch.Tensor:
        """MTP depth ``depth`` (0-based) output [B, T, hidden] at the positions ``cache`` holds next: h_prev is the
        previous depth's (or the main model's normed) output there, next_tokens the tokens one place later."""
        cos, sin = self.cached_rope(next_tokens, cache)
        h = self.mtp[depth](h_prev, self.embed(next_tokens), cos, sin, cache.layer(0))
        cache.commit()
        return h

    # -- load balancing -----------------------------------------------------------------------------

    def reset_buffers(self) -> None:
        """Recompute the buffers no checkpoint holds (RoPE's frequencies, the experts' load counters), for a
        model built on the meta device and then filled from a checkpoint."""
        self.inv_freq = rope_inv_freq(self.cfg)
        for moe in self.moe_layers().values():
            moe.load_counts = torch.zeros(moe.load_counts.shape)

    def moe_layers(self) -> dict[str, MoE]:
        """Every MoE in this (possibly partial) model, keyed by its module path."""
        return {name: m for name, m in self.named_modules() if isinstance(m, MoE)}

    def set_aux_loss_scale(self, scale: float) -> None:
        for moe in self.moe_layers().values():
            moe.aux_loss_scale = scale


def check_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    if tokens.dtype not in (torch.int64, torch.int32):
        raise DataError(f"token ids must be int64 or int32, got {tokens.dtype}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)][0]
        raise DataError(f"token id {int(bad)} is outside the vocabulary [0, {vocab_size}) of ModelConfig.vocab_size")


def _tensor_seed(seed: int, name: str) -> int:
    return zlib.crc32(f"{seed}:{name}".encode())


@torch.no_grad()
def init_weights(model: Transformer, std: float, seed: int) -> None:
    """Normal(0, std) for every matrix (V3: std 0.006), ones for norms, zero router bias.

    Each tensor draws from its own generator keyed by its global name (per expert for stacked experts),
    so a pipeline stage or an expert-parallel shard initialises exactly the weights the full model has.
    """
    for name, tensor in model.state_dict(keep_vars=True).items():
        init_tensor(tensor, name, std, seed)


@torch.no_grad()
def init_tensor(tensor: torch.Tensor, name: str, std: float, seed: int) -> torch.Tensor:
    """Fill one tensor as init_weights fills the tensor of that global name (returns it)."""
    if name.endswith("e_score_correction_bias"):
        return tensor.zero_()
    if tensor.dim() == 1:
        return tensor.fill_(1.0)
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    return tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)


def build_model(cfg: ModelConfig, precision: PrecisionConfig | str | None = None, *,
                device: torch.device | str | None = None, seed: int | None = None) -> Transformer:
    """The full model, initialised; ``seed`` makes the initial weights reproducible (without it the
    seed comes from torch's global generator)."""
    backend = get_backend(precision)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return Transformer(cfg, backend)
    model = Transformer(cfg, backend)
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    init_weights(model, cfg.init_std, seed)
    return model.to(device) if device is not None else model
