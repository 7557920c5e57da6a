"""Published figures of the GPUs d3ray targets, for rooflines and memory budgets (no device is queried).

Peak throughput is dense BF16 tensor-core math (no sparsity); bandwidth is HBM; memory is what the
card has. Sources: NVIDIA's H100 SXM5 and H200 SXM product briefs / datasheets.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    bf16_flops: float  # FLOP/s, dense
    bandwidth: float  # bytes/s
    memory: float  # bytes
    source: str

    def __post_init__(self) -> None:
        for field in ("bf16_flops", "bandwidth", "memory"):
            if not getattr(self, field) > 0:
                raise ValueError(f"DeviceSpec.{field}={getattr(self, field)!r}: must be positive")


H100 = DeviceSpec("H100 SXM5 80GB", 989.4e12, 3.35e12, 80e9,
                  "NVIDIA H100 datasheet: 989 TFLOPS BF16 dense, 3.35 TB/s HBM3, 80 GB")
H200 = DeviceSpec("H200 SXM 141GB", 989.4e12, 4.8e12, 141e9,
                  "NVIDIA H200 datasheet: 989 TFLOPS BF16 dense, 4.8 TB/s HBM3e, 141 GB")
DEVICES = {"h100": H100, "h200": H200}

# What a process can use of a card's memory: the CUDA context, cuBLAS workspaces and the caching
# allocator's fragmentation take the rest (about 1-2 GB in practice at this scale).
USABLE_FRACTION = 0.92
