"""The simulated GPU: which checkpoint is loaded and the VRAM figures `/system_stats` reports.

Figures follow ComfyUI's model_management: `vram_free` is the driver's free memory plus what PyTorch
holds reserved but unused; `torch_vram_total` is what PyTorch has reserved, `torch_vram_free` the unused
part of it.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3
CONTEXT_BYTES = 420 * 1024 ** 2  # CUDA context and driver overhead, never free
CACHE_SLACK_BYTES = 256 * 1024 ** 2  # reserved by the caching allocator beyond the weights


def model_bytes(ckpt_name: str) -> int:
    """A plausible size for a checkpoint's weights on the GPU, from its name."""
    lowered = ckpt_name.lower()
    if "xl" in lowered or "sdxl" in lowered:
        return int(6.9 * GIB)
    if "flux" in lowered:
        return int(11.9 * GIB)
    return int(2.1 * GIB)


@dataclass
class SimGpu:
    name: str
    total: int
    loaded: str | None = None
    loads: int = 0    # checkpoints loaded so far
    swaps: int = 0    # of those, loads that replaced another checkpoint

    @classmethod
    def with_vram(cls, name: str, vram_gb: float) -> SimGpu:
        return cls(name=name, total=int(vram_gb * GIB))

    def needs_load(self, ckpt_name: str) -> bool:
        return self.loaded != ckpt_name

    def load(self, ckpt_name: str) -> None:
        self.loads += 1
        self.swaps += self.loaded is not None
        self.loaded = ckpt_name

    def unload_all(self) -> None:
        self.loaded = None

    def device(self) -> dict[str, object]:
        active = model_bytes(self.loaded) if self.loaded else 0
        reserved = active + CACHE_SLACK_BYTES if self.loaded else 0
        driver_free = max(0, self.total - CONTEXT_BYTES - reserved)
        return {
            "name": f"cuda:0 Simulated GPU ({self.name}) : cudaMallocAsync",
            "type": "cuda",
            "index": 0,
            "vram_total": self.total,
            "vram_free": driver_free + reserved - active,
            "torch_vram_total": reserved,
            "torch_vram_free": reserved - active,
        }
