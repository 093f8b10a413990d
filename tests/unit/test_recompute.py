"""Activation recomputation (moelib.model.recompute hooks, moelib.train.recompute policy): same numbers, fewer bytes
kept, side effects once."""

import contextlib

import pytest
import torch

from moelib import ConfigError, ModelConfig, PrecisionConfig
from moelib.model import build_model
from moelib.parallel.pipeline.segments import backward_steps, drain, forward_steps
from moelib.parallel.pipeline.stage import PipelineStage, StageSpec
from moelib.precision.telemetry import collect_telemetry
from moelib.precision.weight_grad import WeightGradStore
from moelib.train.recompute import MODES, apply_recompute

SMALL = dict(vocab_size=300, hidden_size=48, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=24,
             n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, q_lora_rank=24, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_attention_heads=3, init_std=0.05,
             max_position_embeddings=64, aux_loss_alpha=0.01)
CFG = ModelConfig.from_preset("tiny", **SMALL)
LAYERS = {"dense": "0", "moe": "1"}


def build(mode: str, backend="fp32", **kw):
    model = apply_recompute(build_model(CFG, backend, seed=0), mode, **kw)
    model.train()
    return model


def tokens(shape=(2, 17), seed=0):
    return torch.randint(0, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def counts(model):
    return {n: (m.load_counts.clone(), m.last_aux_loss.clone()) for n, m in model.moe_layers().items()}


def run_layer(model, kind, seed=0, forward_context=contextlib.nullcontext):
    """One decoder layer's forward and backward: (output, input grad, parameter grads)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 9, CFG.hidden_size, generator=g).requires_grad_()
    cos, sin = model.rope(9, hidden.device)
    with model.backend.autocast("cpu"), forward_context():
        out = model.layers[LAYERS[kind]](hidden, cos, sin)
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    return out.detach(), hidden.grad, grads(model)


def run_model(model):
    seq = tokens()
    with model.backend.autocast("cpu"):
        out = model.compute_loss(seq[:, :-1], seq[:, 1:], mtp_weight=0.3)
    out.loss.backward()
    return out.loss.detach(), grads(model)


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def saved_bytes(model, kind) -> int:
    """Unique non-parameter storage bytes autograd saves for one layer (checkpoint inputs included)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    run_layer(model, kind, forward_context=lambda: torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
    return sum(seen.values())


@pytest.mark.parametrize("backend", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_layer_numerics_unchanged(kind, backend):
    ref = run_layer(build("none", backend), kind)
    for mode in ("selective", "full"):
        model = build(mode, backend)
        out, dx, dw = run_layer(model, kind)
        assert torch.equal(out, ref[0]) and torch.equal(dx, ref[1]), mode
        assert_same(dw, ref[2])


def test_model_loss_grads_and_expert_counts_unchanged():
    ref_model = build("none")
    ref_loss, ref_grads = run_model(ref_model)
    ref_counts = counts(ref_model)
    assert all(c.sum() > 0 for c, _ in ref_counts.values())
    for mode in ("selective", "full"):
        model = build(mode)
        loss, g = run_model(model)
        assert torch.equal(loss, ref_loss), mode
        assert_same(g, ref_grads)
        # MoE.finish runs again when a layer is recomputed: loads and the aux loss must count once.
        for name, (c, aux) in counts(model).items():
            assert torch.equal(c, ref_counts[name][0]) and torch.equal(aux, ref_counts[name][1]), (mode, name)


def test_less_is_kept():
    sizes = {mode: saved_bytes(build(mode, "bf16"), "moe") for mode in MODES}
    assert sizes["none"] > sizes["selective"] > sizes["full"]


def test_fp8_swiglu_cache():
    """Under FP8, exact mode is bit-identical; the FP8 SwiGLU cache (V3) keeps fewer bytes and changes only
    the gradients, by about the E4M3 rounding of gate and up."""
    ref = run_layer(build("none", "fp8-emulated"), "moe")
    exact = run_layer(build("selective", "fp8-emulated", fp8_swiglu_cache=False), "moe")
    assert torch.equal(exact[0], ref[0]) and torch.equal(exact[1], ref[1])
    assert_same(exact[2], ref[2])
    out, dx, dw = run_layer(build("selective", "fp8-emulated"), "moe")
    assert torch.equal(out, ref[0])
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    assert 0 < rel(dx, ref[1]) < 0.05
    assert rel(dw["layers.1.mlp.experts.gate_up_proj"], ref[2]["layers.1.mlp.experts.gate_up_proj"]) < 0.1
    assert (saved_bytes(build("selective", "fp8-emulated"), "moe")
            < saved_bytes(build("selective", "fp8-emulated", fp8_swiglu_cache=False), "moe"))


def test_fp8_telemetry_sampled_once():
    precision = PrecisionConfig(backend="fp8-emulated", telemetry_interval=1)
    stats = {}
    for mode in MODES:
        model = build(mode, precision, fp8_swiglu_cache=False)  # the FP8 cache would change "grad" stats
        run_model(model)
        stats[mode] = collect_telemetry(model)
    assert stats["none"] and stats["selective"] == stats["none"] and stats["full"] == stats["none"]


def test_deferred_weight_grads():
    """Zero-bubble W steps: weight grads queued in a recomputed backward equal the immediate ones."""
    _, ref = run_model(build("none", "bf16"))
    for mode in ("selective", "full"):
        model = build(mode, "bf16")
        with WeightGradStore.deferred():
            run_model(model)
        WeightGradStore.pop_all()
        assert_same(grads(model), ref)


def test_segmented_pipeline_pass():
    """The overlapped pipeline schedule runs MoE layers in pieces; recomputation must hold there too."""
    spec = StageSpec(0, 1, tuple(range(CFG.num_hidden_layers)))
    seq = tokens()
    results = {}
    for mode in MODES:
        model = build(mode)
        rec = drain(forward_steps(PipelineStage(model, spec), seq[:, :-1], seq[:, 1:], 0.3,
                                  model.backend.autocast))
        drain(backward_steps(rec, None, 1.0, defer_w=False))
        results[mode] = rec.output.loss.detach(), grads(model), counts(model)
    for mode in ("selective", "full"):
        assert torch.equal(results[mode][0], results["none"][0])
        assert_same(results[mode][1], results["none"][1])
        for name, (c, aux) in results[mode][2].items():
            assert torch.equal(c, results["none"][2][name][0]) and torch.equal(aux, results["none"][2][name][1])


def test_no_grad_and_modes_switch_back():
    model = build("full")
    seq = tokens()
    with torch.no_grad():
        out = model(seq)
    apply_recompute(model, "none")
    assert not any(getattr(m, "recompute", False) or getattr(m, "recompute_layer", False) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(seq), out)


def test_bad_mode():
    with pytest.raises(ConfigError, match="recompute mode must be one of none, selective, full"):
        apply_recompute(build("none"), "layers")


@pytest.mark.parametrize("core", ["fused", "unfused"])
def test_selective_keeps_a_fused_attention_core_and_reruns_the_unfused_one(core, monkeypatch):
    """Selective reruns MLA's up-projections but not a fused SDPA core (its output and logsumexp are kept);
    moelib's unfused CPU core keeps nothing and is rerun; full reruns the layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moelib.model import attention
    from moelib.model.recompute import _ATTENTION_CORE

    if core == "fused":
        monkeypatch.setattr(attention, "_UNFUSED_MAX_SCORES", 0)
    counted = _ATTENTION_CORE if core == "fused" else {torch.ops.aten._softmax}

    class CountAttentionCore(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func.overloadpacket in counted
            return func(*args, **(kwargs or {}))

    calls = {}
    for mode in MODES:
        with CountAttentionCore() as counter:
            run_layer(build(mode), "dense")
        calls[mode] = counter.calls
    assert calls == ({"none": 1, "selective": 1, "full": 2} if core == "fused" else
                     {"none": 1, "selective": 2, "full": 2})
