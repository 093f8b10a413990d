"""The decode bench's FP8-resident part: bytes of dtype="fp8" vs bf16 (the model at hand and v3-671b from its
shapes), and what FP8 costs in logits and greedy tokens, with the embedding in bf16 (V3's release) and in FP8.
"""

from __future__ import annotations

import copy

import torch

from moelib import ModelConfig
from moelib.inference.fp8_weights import fp8_targets, quantize_weights, resident_bytes
from moelib.inference.generate import generate
from moelib.inference.load import cast_bytes, cast_weights, to_bf16
from moelib.model import build_model


def resident(fp32_model) -> dict:
    """Resident bytes of ``fp32_model`` in bf16 and fp8 (measured), v3-671b's ratio (counted from shapes)."""
    bf16 = cast_weights(copy.deepcopy(fp32_model), "bf16")
    fp8 = cast_weights(copy.deepcopy(fp32_model), "fp8")
    out = {"bf16_bytes": resident_bytes(bf16), "fp8_bytes": resident_bytes(fp8)}
    out["ratio"] = out["fp8_bytes"] / out["bf16_bytes"]
    quantised = [getattr(m, a) for m, a in fp8_targets(fp8)]
    out["quantised_weights_ratio"] = (sum(p.numel() + 4 * p.scale_inv.numel() for p in quantised)
                                      / sum(2 * p.numel() for p in quantised))
    v3 = build_model(ModelConfig.from_preset("v3-671b"), "fp32", device="meta")
    out["v3_671b_bf16_bytes"], out["v3_671b_fp8_bytes"] = cast_bytes(v3, "bf16"), cast_bytes(v3, "fp8")
    out["v3_671b_ratio"] = out["v3_671b_fp8_bytes"] / out["v3_671b_bf16_bytes"]
    return out


@torch.no_grad()
def quality(fp32_model, ids: torch.Tensor, new: int) -> dict:
    """{variant: max relative logit error vs bf16 over the prompts' positions (‖Δ‖₂ / ‖bf16‖₂ per position),
    teacher-forced argmax agreement, greedy agreement over ``new`` tokens}, for FP8 with the embedding in
    bf16 and in FP8."""
    bf16 = to_bf16(copy.deepcopy(fp32_model))
    ref = bf16(ids).float()
    ref_tokens = generate(bf16, ids, new).tokens[:, -new:]
    out = {}
    for name, embedding in (("fp8, embedding bf16", False), ("fp8", True)):
        model = to_bf16(quantize_weights(copy.deepcopy(fp32_model), embedding=embedding))
        logits = model(ids).float()
        err = (logits - ref).norm(dim=-1) / ref.norm(dim=-1)
        tokens = generate(model, ids, new).tokens[:, -new:]
        out[name] = {"max_rel_logit_error": float(err.max()),
                     "argmax_agreement": float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
                     "greedy_agreement": float((tokens == ref_tokens).float().mean())}
    return out
