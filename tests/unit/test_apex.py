"""Apex's fused RMSNorm is picked up only where it applies (Apex importable, GPU tensor, not turned off) and is
never required; on a GPU with Apex it matches the pure-PyTorch RMSNorm."""

from __future__ import annotations

import pytest
import torch

from moelib.model.norm import RMSNorm
from moelib.precision import apex


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()).to(weight.dtype)


class FakeApexRMSNorm(torch.autograd.Function):
    """Stands in for Apex's kernel on CPU: the plumbing is under test here, not Apex's numerics."""
    calls = 0

    @staticmethod
    def forward(ctx, x, weight, shape, eps):
        FakeApexRMSNorm.calls += 1
        assert shape == tuple(weight.shape)
        return reference(x, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("not used")


@pytest.fixture
def fake_apex(monkeypatch):
    FakeApexRMSNorm.calls = 0
    monkeypatch.setattr(apex, "FusedRMSNormAffineMixedDtypesFunction", FakeApexRMSNorm)
    monkeypatch.setattr(apex, "ENABLED", True)
    return monkeypatch


def test_apex_runs_only_on_gpu_tensors_and_when_enabled(fake_apex):
    norm, x = RMSNorm(64), torch.randn(3, 64)
    with torch.no_grad():
        expected = norm(x)  # CPU tensor: the pure-PyTorch path
    assert FakeApexRMSNorm.calls == 0
    fake_apex.setattr(apex, "on_gpu", lambda t: True)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), expected)
    assert FakeApexRMSNorm.calls == 1
    fake_apex.setattr(apex, "ENABLED", False)  # MOELIB_APEX=0
    with torch.no_grad():
        norm(x)
    assert FakeApexRMSNorm.calls == 1 and "off" in apex.status()


def test_without_apex_the_pure_path_runs(monkeypatch):
    monkeypatch.setattr(apex, "FusedRMSNormAffineMixedDtypesFunction", None)
    monkeypatch.setattr(apex, "on_gpu", lambda t: True)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    assert apex.fused_rms_norm(x, torch.ones(32), 1e-6) is None
    assert "not importable" in apex.status()
    norm = RMSNorm(32)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), reference(x, norm.weight, 1e-6), atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(apex.FusedRMSNormAffineMixedDtypesFunction is None or not torch.cuda.is_available(),
                    reason="needs NVIDIA Apex built with its CUDA extensions and a CUDA GPU")
def test_apex_matches_pure_rmsnorm_on_gpu(monkeypatch):
    torch.manual_seed(0)
    norm = RMSNorm(1024).cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = norm(x)
    out.float().square().sum().backward()
    grads = (x.grad.clone(), norm.weight.grad.clone())
    x.grad, norm.weight.grad = None, None
    monkeypatch.setattr(apex, "ENABLED", False)
    ref = norm(x)
    ref.float().square().sum().backward()
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=1e-2)  # bf16 rounding of the normalised input
    torch.testing.assert_close(grads[0].float(), x.grad.float(), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(grads[1], norm.weight.grad, atol=5e-1, rtol=2e-2)
