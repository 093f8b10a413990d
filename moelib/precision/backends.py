"""Precision backends: the model asks here for its Linears; the backend decides the numerics.

The model never branches on the backend. Modules that DeepSeek-V3 keeps in high precision (embedding,
output head, MoE gate, norms, attention core) do not come from here and say so where they are built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moelib.config import PrecisionConfig
from moelib.precision.grouped import grouped_linear


class Backend:
    """fp32 / bf16: plain GEMMs; bf16 runs them under autocast with fp32 master weights."""

    def __init__(self, cfg: PrecisionConfig):
        self.cfg = cfg
        self.name = cfg.backend
        self.compute_dtype = torch.bfloat16 if cfg.backend == "bf16" else torch.float32

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return grouped_linear(x, weight, counts)

    @contextlib.contextmanager
    def autocast(self, device_type: str = "cpu") -> Iterator[None]:
        if self.compute_dtype == torch.float32:
            yield
        else:
            with torch.autocast(device_type, dtype=self.compute_dtype):
                yield


def get_backend(cfg: PrecisionConfig | str | None = None) -> Backend:
    if cfg is None:
        cfg = PrecisionConfig(backend="fp32")
    elif isinstance(cfg, str):
        cfg = PrecisionConfig(backend=cfg)
    return Backend(cfg)


class Linear(nn.Module):
    """A bias-free Linear whose GEMMs belong to the precision backend. Weight layout [out, in] as
    nn.Linear, so state dicts are the same whatever the backend."""

    def __init__(self, in_features: int, out_features: int, backend: Backend):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, backend={self.backend.name}"
