"""GPU presets for planning: dense peaks, memory, and the bandwidths the expert all-to-all uses.

Figures per GPU from the datasheets (dense, no sparsity) and, for H800, DeepSeek-V3's own network
(REFERENCE.md section 11): NVLink 160 GB/s and InfiniBand 50 GB/s effective per GPU. H100 nodes are taken
with one 400 Gb/s NIC per GPU (50 GB/s); B200 with NVLink 5 and one 400 Gb/s NIC per GPU. Every figure
can be overridden (tools/plan.py --bf16-tflops, --hbm-gb, ...). HBM bandwidth and SM counts from the
datasheets; the all-to-all keeps 20 SMs, as DeepEP does in V3, on every preset.
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
    hbm_tbps: float         # HBM bandwidth, TB/s
    sms: int                # streaming multiprocessors
    comm_sms: int           # of those, the ones the expert all-to-all kernels keep (DeepEP; V3: 20 of 132)

    @property
    def compute_share(self) -> float:
        """The share of the SMs left to compute while the expert all-to-all runs."""
        return (self.sms - self.comm_sms) / self.sms

    def peak_flops(self, precision: str) -> float:
        """Dense FLOP/s of the GEMMs in ``precision`` ("bf16" or "fp8")."""
        return 1e12 * (self.fp8_tflops if precision == "fp8" else self.bf16_tflops)

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gb * 2**30


PRESETS = {
    "h800": Hardware("h800", 989.0, 1979.0, 80.0, 160.0, 50.0, 8, 3.35, 132, 20),
    "h100": Hardware("h100", 989.0, 1979.0, 80.0, 450.0, 50.0, 8, 3.35, 132, 20),
    "h200": Hardware("h200", 989.0, 1979.0, 141.0, 450.0, 50.0, 8, 4.8, 132, 20),
    "b200": Hardware("b200", 2250.0, 4500.0, 180.0, 900.0, 50.0, 8, 8.0, 148, 20),
}


def hardware(name: str, **overrides: float | int | None) -> Hardware:
    """The preset ``name`` with every non-None override applied; ConfigError names --gpu or the figure."""
    if name not in PRESETS:
        raise ConfigError(f"--gpu: unknown GPU preset {name!r} (known: {', '.join(PRESETS)})")
    chosen = {k: v for k, v in overrides.items() if v is not None}
    for key, value in chosen.items():
        if not (value >= 0 if key == "comm_sms" else value > 0):
            raise ConfigError(f"--{key.replace('_', '-')}: must be {'>= 0' if key == 'comm_sms' else 'positive'}, "
                              f"got {value}")
    hw = dataclasses.replace(PRESETS[name], **chosen)
    if hw.comm_sms >= hw.sms:
        raise ConfigError(f"--comm-sms: {hw.comm_sms} leaves none of the GPU's {hw.sms} SMs (--sms) to compute")
    return hw


def efficiency_from_kernels(path: str, hw: Hardware, precision: str) -> float:
    """The GEMM efficiency a ``bench.py kernels`` JSON measured: all its GEMMs and grouped GEMMs (FP8 rates,
    or torch's bf16 ones for bf16) as total FLOPs over total time, divided by ``hw``'s dense peak."""
    import json

    try:
        with open(path) as f:
            result = json.load(f)
    except OSError as e:
        raise ConfigError(f"--kernels: cannot read {path} ({e.strerror})") from None
    except ValueError:
        raise ConfigError(f"--kernels: {path} is not a JSON file written by bench.py kernels") from None
    if not isinstance(result, dict) or not isinstance(result.get("gemm"), list):
        raise ConfigError(f"--kernels: {path} has no 'gemm' list (not a bench.py kernels result)")
    if result.get("smoke") or result.get("device") != "cuda":
        raise ConfigError(f"--kernels: {path} is a --smoke or CPU run, whose times say nothing about a GPU")
    key = "tflops" if precision == "fp8" else "bf16_tflops"
    flops = seconds = 0.0
    for g in result["gemm"] + result.get("grouped_gemm", []):
        rate = g.get(key)
        if not isinstance(rate, (int, float)) or rate <= 0:
            continue
        work = 2.0 * g.get("m", g.get("m_per_expert", 0)) * g.get("experts", 1) * g["n"] * g["k"]
        flops, seconds = flops + work, seconds + work / (rate * 1e12)
    if not flops:
        raise ConfigError(f"--kernels: {path} holds no {precision} GEMM rate")
    return min(1.0, flops / seconds / hw.peak_flops(precision))
