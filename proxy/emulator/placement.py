"""Where a model's memory goes on an emulated server: one GPU, a layer split, or spilled to RAM.

Ollama (HEAD) puts a runner on the single GPU with the most free memory that fits it; with
OLLAMA_SCHED_SPREAD, or when no single GPU fits, it splits the layers over all GPUs; the first
model always loads, spilling what does not fit to system RAM (ollama.md §6.4).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config import GIB

OVERHEAD_BYTES = int(0.3 * GIB)
"""CUDA context and compute buffer per GPU a runner uses."""


@dataclass(kw_only=True)
class Placement:
    """Where a runner's memory lives: bytes per GPU index, and what spilled to system RAM."""

    vram: dict[int, int]
    cpu_bytes: int = 0

    @property
    def size_vram(self) -> int:
        return sum(self.vram.values())

    @property
    def size(self) -> int:
        return self.size_vram + self.cpu_bytes

    def share(self, gpu: int) -> float:
        """Fraction of the model's layers on ``gpu``."""
        total = self.size
        return self.vram.get(gpu, 0) / total if total else 0.0


def fit(need: int, free: dict[int, int], *, spread: bool) -> Placement | None:
    """Place ``need`` bytes (weights + KV) in ``free`` bytes per GPU without spilling, or None."""
    if not free:
        return None
    if not spread:
        best = max(free, key=lambda i: (free[i], -i))
        if need + OVERHEAD_BYTES <= free[best]:
            return Placement(vram={best: need + OVERHEAD_BYTES})
    usable = {i: f - OVERHEAD_BYTES for i, f in free.items() if f > OVERHEAD_BYTES}
    can_split = len(free) > 1 or spread
    if can_split and usable and sum(usable.values()) >= need:
        return Placement(vram=split(need, usable))
    return None


def spill(need: int, free: dict[int, int]) -> Placement:
    """Put what fits on the GPUs and the rest in system RAM."""
    usable = {i: f - OVERHEAD_BYTES for i, f in free.items() if f > OVERHEAD_BYTES}
    on_gpu = min(sum(usable.values()), need)
    vram = split(on_gpu, usable) if on_gpu > 0 else {}
    return Placement(vram=vram, cpu_bytes=need - on_gpu)


def split(total: int, usable: dict[int, int]) -> dict[int, int]:
    """Spread ``total`` bytes over GPUs in proportion to their usable memory, plus overhead each."""
    capacity = sum(usable.values())
    return {i: int(total * u / capacity) + OVERHEAD_BYTES for i, u in usable.items() if u > 0}
