"""ParameterEMA: the closed-form average, background updates that never see later parameter changes,
checkpoint keys equal to the model's state-dict keys (per expert, global index), round trips, bad loads."""

from __future__ import annotations

import threading

import pytest
import torch

from moelib import ModelConfig
from moelib.errors import CheckpointError
from moelib.model import build_model
from moelib.train.ema import ParameterEMA

DECAY = 0.8


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig.from_preset("tiny")


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for an optimizer step: new values for every parameter, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def param_keys(model: torch.nn.Module) -> set[str]:
    """The model's state-dict keys that are parameters (not buffers such as the router bias)."""
    return {k for k in model.state_dict() if not k.endswith("e_score_correction_bias")}


def test_matches_the_closed_form_in_fp64(cfg, capsys):
    """ema_n = d^n·p_0 + Σ_k (1 − d)·d^(n−k)·p_k, per model state-dict key, after 6 updates."""
    model = build_model(cfg, "fp32", seed=0)
    ema = ParameterEMA.from_modules(model, DECAY)
    history = [{k: v.double().clone() for k, v in model.state_dict().items()}]
    for step in range(1, 7):
        perturb(model, step)
        ema.update(step)
        history.append({k: v.double().clone() for k, v in model.state_dict().items()})
    state = ema.state_dict()
    assert {k.removeprefix("ema.") for k in state} == param_keys(model)
    assert "ema.layers.1.mlp.experts.7.up_proj.weight" in state  # per expert, as the model names them
    n, worst = len(history) - 1, 0.0
    for key, value in state.items():
        name = key.removeprefix("ema.")
        want = DECAY ** n * history[0][name] + sum((1 - DECAY) * DECAY ** (n - k) * history[k][name]
                                                   for k in range(1, n + 1))
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        worst = max(worst, float((value.double() - want).abs().max() / want.abs().max()))
    with capsys.disabled():
        print(f"\n[ema] max |ema - fp64 closed form| / max|ema| over tensors after 6 updates: {worst:.2e}")
    assert worst <= 6 * 2.0 ** -23
    assert ema.step == 6
    ema.close()


def test_update_returns_before_the_worker_and_snapshots_the_parameters():
    """The worker is held at a gate inside its lerp: update() returns all the same (a timer opens the
    gate only so that a broken update cannot hang the suite). Parameters then change in place before the
    gate opens; the average still folds in the values they had at update()."""
    layer = torch.nn.Linear(6, 5)
    ema = ParameterEMA(dict(layer.named_parameters()), DECAY)
    p0 = {n: p.detach().double().clone() for n, p in layer.named_parameters()}
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(-3).add_(1)
    p1 = {n: p.detach().double().clone() for n, p in layer.named_parameters()}
    gate, inside = threading.Event(), threading.Event()
    lerp = ema._apply

    def held_lerp():
        inside.set()
        gate.wait()
        lerp()

    ema._apply = held_lerp
    guard = threading.Timer(60, gate.set)
    guard.start()
    try:
        ema.update(1)
        returned_while_held = not gate.is_set()
        assert inside.wait(60)  # the worker is in its lerp, stopped at the gate
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(1000.0)  # after update() returned: must not reach the average
    finally:
        gate.set()
        guard.cancel()
    assert returned_while_held
    assert ema._thread.daemon
    state = ema.state_dict()
    for n in p0:
        want = DECAY * p0[n] + (1 - DECAY) * p1[n]
        assert torch.allclose(state[f"ema.{n}"].double(), want, rtol=0, atol=1e-6)


def test_worker_errors_surface_at_the_next_wait_or_update():
    layer = torch.nn.Linear(3, 2)
    ema = ParameterEMA(dict(layer.named_parameters()), DECAY)
    lerp = ema._apply

    def broken():
        raise ValueError("lerp exploded")

    ema._apply = broken
    ema.update(1)
    with pytest.raises(ValueError, match="lerp exploded"):
        ema.wait()
    ema.update(2)
    with pytest.raises(ValueError, match="lerp exploded"):
        ema.update(3)  # reported by the next update, before it starts another
    ema._apply = lerp
    ema.update(4)
    ema.wait()  # reported once; the worker lives on


def test_state_dict_round_trip(cfg):
    model = build_model(cfg, "fp32", seed=0)
    ema = ParameterEMA.from_modules(model, DECAY)
    for step in range(1, 4):
        perturb(model, step)
        ema.update(step)
    saved = ema.state_dict()
    other = ParameterEMA.from_modules(build_model(cfg, "fp32", seed=1), DECAY)
    assert other.keys() == ema.keys() == list(saved)
    other.load_state_dict({k: v.to(torch.bfloat16) for k, v in saved.items()})  # another dtype converts
    other.load_state_dict(saved)
    back = other.state_dict()
    assert all(torch.equal(back[k], saved[k]) for k in saved)
    perturb(model, 9)
    ema.update(4)
    assert all(torch.equal(saved[k], back[k]) for k in saved)  # state_dict() returned copies


@pytest.mark.parametrize("edit, phrase", [
    (lambda sd: sd.pop("ema.layers.1.mlp.experts.3.down_proj.weight"),
     "EMA tensor ema.layers.1.mlp.experts.3.down_proj.weight is missing"),
    (lambda sd: sd.update({"ema.layers.9.mlp.gate.weight": torch.zeros(2)}),
     "EMA tensor ema.layers.9.mlp.gate.weight in the checkpoint is not a parameter"),
    (lambda sd: sd.update({"ema.norm.weight": torch.zeros(3)}), r"EMA tensor ema.norm.weight has shape \(3,\)"),
])
def test_bad_loads_name_the_tensor_and_load_nothing(cfg, edit, phrase):
    ema = ParameterEMA.from_modules(build_model(cfg, "fp32", seed=0), DECAY)
    before = ema.state_dict()
    bad = {k: v + 1 for k, v in before.items()}
    edit(bad)
    with pytest.raises(CheckpointError, match=phrase):
        ema.load_state_dict(bad)
    after = ema.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_evaluating_with_the_average(cfg):
    model = build_model(cfg, "fp32", seed=0)
    ema = ParameterEMA.from_modules(model, DECAY)
    perturb(model, 1)
    ema.update(1)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = ema.state_dict()
    with ema.applied():
        inside = model.state_dict()
        assert all(torch.equal(inside[k.removeprefix("ema.")], v) for k, v in averaged.items())
        assert all(torch.equal(inside[k], training[k]) for k in training if "e_score_correction_bias" in k)
    assert all(torch.equal(v, training[k]) for k, v in model.state_dict().items())
    fresh = build_model(cfg, "fp32", seed=5)
    ema.copy_to(fresh)
    got = fresh.state_dict()
    assert all(torch.equal(got[k.removeprefix("ema.")], v) for k, v in averaged.items())


def test_expert_shards_use_global_names_and_union_to_the_full_model(cfg):
    """Two expert-parallel 'ranks' holding experts 0-7 and 8-15 of every MoE layer: their EMA keys are
    the full model's keys for those experts, and the union of their state dicts is the full EMA's."""
    full = build_model(cfg, "fp32", seed=0)
    full_ema = ParameterEMA.from_modules(full, DECAY)
    union = {}
    for rank in range(2):
        part = build_model(cfg, "fp32", seed=0)
        for mod in part.modules():
            if hasattr(mod, "expert_offset"):
                half = mod.num_experts // 2
                for attr in ("gate_up_proj", "down_proj"):
                    kept = getattr(mod, attr).detach()[rank * half: (rank + 1) * half].clone()
                    setattr(mod, attr, torch.nn.Parameter(kept))
                mod.num_experts, mod.expert_offset = half, rank * half
        sd = ParameterEMA.from_modules(part, DECAY).state_dict()
        routed = {k for k in sd if ".experts." in k}
        assert len(routed) == 3 * 8 * len(part.moe_layers()) and not routed & set(union)  # one rank each
        union.update(sd)  # dense tensors: the same on both ranks
    want = full_ema.state_dict()
    assert set(union) == set(want)
    assert all(torch.equal(union[k], want[k]) for k in want)


def test_decay_must_lie_in_unit_interval():
    with pytest.raises(ValueError, match="decay"):
        ParameterEMA({"w": torch.zeros(2)}, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream device-to-host snapshot needs CUDA")
def test_cuda_snapshot_is_ordered_before_later_writes():
    """Parameters on the GPU: the copy runs on a side stream into pinned memory, and writes the compute
    stream queues right after update() (no host synchronisation in between) wait for it."""
    w = torch.nn.Parameter(torch.ones(4096, 1024, device="cuda"))
    ema = ParameterEMA({"w": w}, DECAY)
    assert all(e.average.is_pinned() and e.snapshot.is_pinned() for e in ema._entries)
    for step in range(1, 4):
        with torch.no_grad():
            w.fill_(float(step))
        ema.update(step)
        with torch.no_grad():
            for _ in range(20):  # queued behind the copy, must not reach the snapshot
                w.mul_(-7.0)
    want = 1.0
    for step in range(1, 4):
        want = DECAY * want + (1 - DECAY) * step
    got = ema.state_dict()["ema.w"]
    assert torch.allclose(got, torch.full_like(got, want), rtol=1e-6, atol=0)

