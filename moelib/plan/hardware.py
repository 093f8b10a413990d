"""GPU presets for planning: dense peaks, memory, and the bandwidths the expert all-to-all uses.

Figures per GPU from the datasheets (dense, no sparsity) and, for H800, DeepSeek-V3's own network
(REFERENCE.md section 11): NVLink 160 GB/s and InfiniBand 50 GB/s effective per GPU. H100 nodes are taken
with one 400 Gb/s NIC per GPU (50 GB/s); B200 with NVLink 5 and one 400 Gb/s NIC per GPU. Every figure
can be overridden (tools/plan.py --peak-bf16-tflops, --hbm-gb, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moelib.errors import ConfigError


@dataclass(frozen=True)
class Hardware:
    name: str
    bf16_tflops: float      # dense peak
    fp8_tflops: float
    hbm_gb: float           # GiB of HBM per GPU
    nvlink_gbps: float      # GB/s per GPU, effective, one direction
    network_gbps: float     # GB/s per GPU across nodes
    gpus_per_node: int

    def peak_flops(self, precision: str) -> float:
        """Dense FLOP/s of the GEMMs in ``precision`` ("bf16" or "fp8")."""
        return 1e12 * (self.fp8_tflops if precision == "fp8" else self.bf16_tflops)

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gb * 2**30


PRESETS = {
    "h800": Hardware("h800", 989.0, 1979.0, 80.0, 160.0, 50.0, 8),
    "h100": Hardware("h100", 989.0, 1979.0, 80.0, 450.0, 50.0, 8),
    "h200": Hardware("h200", 989.0, 1979.0, 141.0, 450.0, 50.0, 8),
    "b200": Hardware("b200", 2250.0, 4500.0, 180.0, 900.0, 50.0, 8),
}


def hardware(name: str, **overrides: float | int | None) -> Hardware:
    """The preset ``name`` with every non-None override applied; ConfigError names --gpu or the figure."""
    if name not in PRESETS:
        raise ConfigError(f"--gpu: unknown GPU preset {name!r} (known: {', '.join(PRESETS)})")
    chosen = {k: v for k, v in overrides.items() if v is not None}
    for key, value in chosen.items():
        if not value > 0:
            raise ConfigError(f"--{key.replace('_', '-')}: must be positive, got {value}")
    return dataclasses.replace(PRESETS[name], **chosen)
