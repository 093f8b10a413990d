"""FP8 quantisation error of 1x128 / 128x128 tiles vs one per-tensor scale, and FP8 vs bf16 saved-activation bytes.

Part 1 trains the tiny preset briefly (bf16, default corpus), then captures the input and the output
gradient of every Linear and expert GEMM in one fp32 forward/backward on a fresh batch, and quantises each
to E4M3 three ways: 1x128 tiles along the GEMM's inner dimension (V3's activation/gradient tiles), 128x128
blocks (V3's weight blocks) and one per-tensor scale. Synthetic tensors with outlier channels and spikes
show what real activations may hide. Reported per scheme: the pooled relative RMS error
sqrt(sum err^2 / sum x^2), the RMS and the max over tokens (rows) of each token's relative error
||err_row|| / ||x_row||, and the fraction of non-zero elements flushed to zero.

Part 2 counts the bytes autograd saves for backward in one dense and one MoE decoder layer under bf16 and
fp8-emulated (torch.autograd.graph.saved_tensors_hooks), once for the whole layer and once for what the
Linear/expert GEMMs alone save. Each distinct storage counts once, parameters not at all, and the count is
taken at two batch sizes so that the per-token figure is the slope (anything per-step cancels).
"""

from __future__ import annotations

import contextlib
import math

import torch

from moelib import ModelConfig, TrainConfig
from moelib.model import build_model
from moelib.precision import fp8
from moelib.precision.backends import name_linears
from moelib.train.data import BatchLoader, default_dataset
from moelib.train.trainer import Trainer

SCHEMES = ("1x128", "128x128", "tensor")


def add_args(p) -> None:
    p.add_argument("--preset", default="tiny")
    p.add_argument("--train-steps", type=int, default=60, help="bf16 steps before capturing activations")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)


# ---- quantisation error ---------------------------------------------------------------------------------


def round_trip(x: torch.Tensor, scheme: str) -> torch.Tensor:
    """dequant(quant(x)) in fp32 under one scheme."""
    if scheme == "tensor":
        s = fp8.scale_from_amax(x.abs().amax(), 448.0, False)
        return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    block = (1, 128) if scheme == "1x128" else (128, 128)
    return fp8.dequantize(*fp8.quantize(x, block), block)


class ErrorStats:
    """Pooled relative RMS error (dominated by the largest elements) and per-token relative errors (every
    row weighted alike: a token whose values are small next to the tensor's amax suffers under a coarse
    scale, and the GEMM then gets that token's output row wrong by as much)."""

    def __init__(self) -> None:
        self.err2 = dict.fromkeys(SCHEMES, 0.0)
        self.row_err2 = dict.fromkeys(SCHEMES, 0.0)
        self.row_max = dict.fromkeys(SCHEMES, 0.0)
        self.flushed = dict.fromkeys(SCHEMES, 0)
        self.x2, self.nonzero, self.rows, self.tensors = 0.0, 0, 0, 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        row_x2 = x.double().pow(2).sum(1)
        live = row_x2 > 0
        if not bool(live.any()):
            return
        self.x2 += float(row_x2.sum())
        self.nonzero += int((x != 0).sum())
        self.rows += int(live.sum())
        self.tensors += 1
        for scheme in SCHEMES:
            back = round_trip(x, scheme)
            row_e2 = (back - x).double().pow(2).sum(1)
            rel = (row_e2[live] / row_x2[live]).sqrt()
            self.err2[scheme] += float(row_e2.sum())
            self.row_err2[scheme] += float(rel.pow(2).sum())
            self.row_max[scheme] = max(self.row_max[scheme], float(rel.max()))
            self.flushed[scheme] += int(((back == 0) & (x != 0)).sum())

    def summary(self) -> dict:
        return {s: {"rel_rms": math.sqrt(self.err2[s] / self.x2),
                    "token_rel_rms": math.sqrt(self.row_err2[s] / self.rows),
                    "token_rel_max": self.row_max[s], "flushed_to_zero": self.flushed[s] / self.nonzero}
                for s in SCHEMES} | {"tensors": self.tensors}


def corpus_loader(cfg: ModelConfig, batch: int, seq: int, seed: int) -> BatchLoader:
    return BatchLoader(default_dataset(cfg.vocab_size, seq), batch, seed=seed)


@contextlib.contextmanager
def capture_gemm_operands(backend, activations: ErrorStats, gradients: ErrorStats):
    """Route the backend's Linear and expert GEMMs through a wrapper that records inputs and output grads."""
    linear, grouped = backend.linear, backend.grouped_linear

    def record(x, y):
        activations.add(x)
        if y.requires_grad:
            y.register_hook(lambda g: gradients.add(g))
        return y

    backend.linear = lambda x, w, **kw: record(x, linear(x, w, **kw))
    backend.grouped_linear = lambda x, w, c, **kw: record(x, grouped(x, w, c, **kw))
    try:
        yield
    finally:
        del backend.linear, backend.grouped_linear


def real_tensor_errors(args) -> dict:
    cfg = ModelConfig.from_preset(args.preset)
    loader = corpus_loader(cfg, args.batch, args.seq, args.seed)
    tc = TrainConfig(micro_batch_size=args.batch, seq_length=args.seq, train_iters=max(1, args.train_steps),
                     seed=args.seed, precision={"backend": "bf16"})
    trainer = Trainer(cfg, tc)
    if args.train_steps > 0:
        for _ in trainer.train(loader):
            pass
    model = trainer.model
    acts, grads = ErrorStats(), ErrorStats()
    tokens, labels = loader.next_batch()
    with capture_gemm_operands(model.backend, acts, grads):  # fp32 forward: no autocast here
        model.compute_loss(tokens, labels, tc.mtp_loss_weight).loss.backward()
    return {"activations": acts.summary(), "gradients": grads.summary()}


def synthetic_errors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2048, 1024, generator=g)
    channels = base.clone()
    outlier_cols = torch.randperm(1024, generator=g)[:10]
    channels[:, outlier_cols] *= 100.0  # a few outlier feature channels, as in LLM activations
    spikes = base.clone()
    spikes.view(-1)[torch.randperm(base.numel(), generator=g)[:20]] = 1e4  # isolated huge values
    rows = base * torch.pow(10.0, -6 * torch.rand(2048, 1, generator=g))  # per-token magnitudes over 6 decades
    out = {}
    for name, x in (("gaussian", base), ("outlier_channels_x100", channels), ("spikes_1e4", spikes),
                    ("token_scales_1e-6..1", rows)):
        stats = ErrorStats()
        stats.add(x)
        out[name] = stats.summary()
    return out


# ---- saved-for-backward bytes ---------------------------------------------------------------------------


def saved_bytes(model, layer, hidden: torch.Tensor) -> dict[str, int]:
    """Unique storage bytes saved for backward by ``layer`` on ``hidden``: whole layer and GEMMs alone."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[str, dict[int, int]] = {"layer": {}, "gemm": {}}
    tag = ["layer"]

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            seen["layer"][ptr] = storage.nbytes()
            if tag[-1] == "gemm":
                seen["gemm"][ptr] = storage.nbytes()
        return t

    backend = model.backend
    linear, grouped = backend.linear, backend.grouped_linear

    def tagged(fn):
        def call(*a, **kw):
            tag.append("gemm")
            try:
                return fn(*a, **kw)
            finally:
                tag.pop()
        return call

    backend.linear, backend.grouped_linear = tagged(linear), tagged(grouped)
    cos, sin = model.rope(hidden.shape[1], hidden.device)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), backend.autocast("cpu"):
            out = layer(hidden, cos, sin)
    finally:
        del backend.linear, backend.grouped_linear
    del out
    return {k: sum(v.values()) for k, v in seen.items()}


def activation_bytes(args) -> dict:
    cfg = ModelConfig.from_preset(args.preset)
    out = {}
    for kind, index in (("dense", 0), ("moe", cfg.first_k_dense_replace)):
        per_backend = {}
        for backend in ("bf16", "fp8-emulated"):
            model = build_model(cfg, backend, seed=args.seed)
            name_linears(model)
            model.train()
            layer = model.layers[str(index)]
            counts = []
            for batch in (2, 4):
                g = torch.Generator().manual_seed(args.seed)
                hidden = torch.randn(batch, args.seq, cfg.hidden_size, generator=g).requires_grad_()
                counts.append(saved_bytes(model, layer, hidden))
            tokens = 2 * args.seq
            per_backend[backend] = {k: (counts[1][k] - counts[0][k]) / tokens for k in counts[0]}
        bf16, fp8_ = per_backend["bf16"], per_backend["fp8-emulated"]
        out[kind] = {"bytes_per_token": per_backend,
                     "ratio_gemm_inputs": fp8_["gemm"] / bf16["gemm"], "ratio_layer": fp8_["layer"] / bf16["layer"]}
    return out


def run(args) -> dict:
    torch.manual_seed(args.seed)
    real = real_tensor_errors(args)
    synthetic = synthetic_errors(args.seed)
    memory = activation_bytes(args)

    print(f"\nE4M3 round-trip error ({args.preset} after {args.train_steps} bf16 steps; synthetic 2048x1024)")
    print(f"{'tensors':<28} {'scheme':<8} {'rel RMS':>9} {'token RMS':>10} {'token max':>10} {'flushed':>9}")
    rows = [(f"real {k} ({v['tensors']})", v) for k, v in real.items()] + list(synthetic.items())
    for name, stats in rows:
        for scheme in SCHEMES:
            s = stats[scheme]
            print(f"{name:<28} {scheme:<8} {s['rel_rms']:9.2e} {s['token_rel_rms']:10.2e} {s['token_rel_max']:10.2e} "
                  f"{s['flushed_to_zero']:9.2e}")
    print("\nsaved for backward, bytes per token (one decoder layer, slope over batch 2 -> 4)")
    print(f"{'layer':<6} {'what':<12} {'bf16':>10} {'fp8':>10} {'fp8/bf16':>9}")
    for kind, m in memory.items():
        b, f = m["bytes_per_token"]["bf16"], m["bytes_per_token"]["fp8-emulated"]
        print(f"{kind:<6} {'GEMM inputs':<12} {b['gemm']:10.0f} {f['gemm']:10.0f} {m['ratio_gemm_inputs']:9.3f}")
        print(f"{kind:<6} {'whole layer':<12} {b['layer']:10.0f} {f['layer']:10.0f} {m['ratio_layer']:9.3f}")
    return {"preset": args.preset, "train_steps": args.train_steps, "batch": args.batch, "seq": args.seq,
            "error_real": real, "error_synthetic": synthetic, "saved_bytes": memory}
