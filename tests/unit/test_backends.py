"""Precision backends: selection from PrecisionConfig, autocast, training steps, telemetry, Transformer Engine."""

from __future__ import annotations

import contextlib

import pytest
import torch

from moelib import ConfigError, ModelConfig, PrecisionConfig, TrainConfig
from moelib.config import PRECISION_BACKENDS
from moelib.model import build_model
from moelib.model.mla import MLA
from moelib.precision.backends import Backend, Fp8Backend, get_backend
from moelib.precision.linear import EMULATED
from moelib.precision.te import te_unavailable_reason
from moelib.precision.telemetry import collect_telemetry
from moelib.precision.weight_grad import WeightGradStore
from moelib.train.trainer import Trainer


def test_backend_names_and_config_validation():
    assert PRECISION_BACKENDS == ("fp32", "bf16", "fp8-emulated", "fp8-triton", "fp8-te")
    for bad, field in [(dict(backend="fp8"), "backend"), (dict(pow2_scales=1), "pow2_scales"),
                       (dict(telemetry_interval=-1), "telemetry_interval"), (dict(amax_history_len=0),
                                                                              "amax_history_len")]:
        with pytest.raises(ConfigError, match=rf"PrecisionConfig\.{field}"):
            PrecisionConfig(**bad)
    cfg = TrainConfig.from_dict({"precision": {"backend": "fp8-emulated", "pow2_scales": True}}).precision
    assert cfg.is_fp8 and cfg.pow2_scales


@pytest.mark.parametrize("name,dtype,fp8", [("fp32", None, False), ("bf16", torch.bfloat16, False),
                                            ("fp8-emulated", torch.bfloat16, True)])
def test_backend_selection_and_autocast(name, dtype, fp8):
    backend = get_backend(name)
    assert isinstance(backend, Backend) and backend.is_fp8 == fp8
    if fp8:
        assert isinstance(backend, Fp8Backend) and backend.kernels is EMULATED
    with backend.autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") == (dtype is not None)
        if dtype is not None:
            assert torch.get_autocast_dtype("cpu") == dtype


def test_high_precision_modules_stay_out_of_fp8():
    """Embedding, head, gate, norms and the attention core do not come from the backend (V3)."""
    model = build_model(ModelConfig.from_preset("tiny"), "fp8-emulated", seed=0)
    assert type(model.lm_head) is torch.nn.Linear and type(model.embed_tokens) is torch.nn.Embedding
    assert not hasattr(model.layers["1"].mlp.gate, "backend")
    assert isinstance(model.layers["0"].self_attn, MLA)


@pytest.mark.slow
def test_fp8_emulated_training_steps_with_telemetry():
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=2)
    tc = TrainConfig(micro_batch_size=2, seq_length=32, train_iters=3, lr_warmup_iters=1,
                     precision={"backend": "fp8-emulated", "telemetry_interval": 2, "pow2_scales": True})
    trainer = Trainer(cfg, tc)
    g = torch.Generator().manual_seed(0)
    batches = ((t[:, :-1], t[:, 1:]) for t in iter(lambda: torch.randint(0, cfg.vocab_size, (2, 33), generator=g),
                                                     None))
    results = list(trainer.train(batches))
    assert len(results) == 3 and all(torch.isfinite(torch.tensor(r.loss)) for r in results)
    stats = collect_telemetry(trainer.model)
    assert "layers.0.self_attn.o_proj.weight" in stats and "layers.1.mlp.experts.gate_up_proj.weight" not in stats
    assert "layers.1.mlp.experts.gate_up_proj" in stats and "layers.1.mlp.experts.down_proj" in stats
    o_proj = stats["layers.0.self_attn.o_proj.weight"]
    assert set(o_proj) == {"input", "weight", "grad"}
    assert len(o_proj["input"]["amax_history"]) == 2  # steps 1 and 3 of 3
    # power-of-two scales everywhere: no element sits exactly at 448 unless its amax is 448·2^n
    assert o_proj["weight"]["saturated"] < o_proj["weight"]["tiles"]


@pytest.mark.gpu
@pytest.mark.skipif(te_unavailable_reason() is not None, reason=f"fp8-te cannot run here: {te_unavailable_reason()}")
def test_te_backend_close_to_emulated():
    """Transformer Engine's Float8BlockScaling against moelib's emulation of the same recipe (pow2 scales)."""
    x = torch.randn(64, 256, device="cuda")
    w = torch.nn.Parameter(torch.randn(384, 256, device="cuda") * 0.02)
    outs = []
    for name in ("fp8-te", "fp8-emulated"):
        backend = get_backend(PrecisionConfig(backend=name, pow2_scales=True))
        with backend.autocast("cuda"):
            outs.append(backend.linear(x, w).float())
    assert torch.allclose(outs[0], outs[1], rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_high_precision_weight_grads_can_be_deferred(precision):
    """The zero-bubble B/W split also works without FP8: dX at once, dW when the store is popped."""


    backend = get_backend(precision)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 16, generator=gen, requires_grad=True)
    w = torch.randn(8, 16, generator=gen, requires_grad=True)
    we = torch.randn(3, 8, 16, generator=gen, requires_grad=True)
    counts = torch.tensor([5, 0, 7])

    def run(defer: bool):
        for t in (x, w, we):
            t.grad = None
        WeightGradStore.clear()
        with backend.autocast("cpu"):
            y = backend.linear(x, w).sum() + backend.grouped_linear(x, we, counts).sum()
        with WeightGradStore.deferred() if defer else contextlib.nullcontext():
            y.backward()
        grads_before_w = (w.grad, we.grad)
        WeightGradStore.pop_all()
        return x.grad.clone(), w.grad.clone(), we.grad.clone(), grads_before_w

    gx, gw, gwe, _ = run(False)
    dx, dw, dwe, before = run(True)
    assert before == (None, None)
    assert torch.equal(gx, dx) and torch.equal(gw, dw) and torch.equal(gwe, dwe)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_high_precision_weight_grads_accumulate_into_the_kept_buffer(precision):
    """dW is added straight into ``weight.grad`` (the trainer's kept buffer, not replaced) over micro-batches;
    a weight that is not a leaf still gets its gradient through autograd."""
    backend = get_backend(precision)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(12, 16, generator=gen) for _ in range(2)]
    w = torch.randn(8, 16, generator=gen, requires_grad=True)
    we = torch.randn(3, 8, 16, generator=gen, requires_grad=True)
    base = torch.randn(8, 16, generator=gen, requires_grad=True)  # used through a non-leaf view of it
    counts = torch.tensor([5, 0, 7])
    w.grad, we.grad = torch.zeros_like(w), torch.zeros_like(we)
    kept = (w.grad.data_ptr(), we.grad.data_ptr())
    for x in xs:
        with backend.autocast("cpu"):
            y = (backend.linear(x, w).sum() + backend.grouped_linear(x, we, counts).sum()
                 + backend.linear(x, base * 2).sum())
        y.backward()
    assert (w.grad.data_ptr(), we.grad.data_ptr()) == kept

    def ref(x64):  # d(sum of outputs)/dW: every output row's gradient is ones
        groups = torch.repeat_interleave(torch.arange(3), counts)
        dwe = torch.stack([torch.ones(int(c), 8, dtype=torch.float64).t() @ x64[groups == e] for e, c in
                           enumerate(counts)])
        return torch.ones(12, 8, dtype=torch.float64).t() @ x64, dwe

    # Against the inputs as the GEMMs see them; bf16 then rounds each micro-batch's dW (|dW| <~ 10) once.
    seen = [x.to(backend.compute_dtype).double() for x in xs]
    dw, dwe = sum(ref(x)[0] for x in seen), sum(ref(x)[1] for x in seen)
    tol = dict(rtol=1e-5, atol=1e-5) if precision == "fp32" else dict(rtol=1e-2, atol=2 * 10 * 2**-8)
    torch.testing.assert_close(w.grad.double(), dw, **tol)
    torch.testing.assert_close(we.grad.double(), dwe, **tol)
    torch.testing.assert_close(base.grad.double(), 2 * dw, **tol)
