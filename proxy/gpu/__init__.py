"""GPU memory and utilization behind one protocol, whatever reads it (NVML, HTTP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, kw_only=True)
class GpuReading:
    """One GPU at one moment; the JSON of ``GET /gpus`` has exactly these keys."""

    index: int
    uuid: str
    name: str
    memory_total: int
    memory_used: int
    memory_free: int
    utilization: float
    """0..1, share of the last sample period the GPU was computing."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GpuReading:
        return cls(
            index=int(data["index"]),
            uuid=str(data["uuid"]),
            name=str(data.get("name", "")),
            memory_total=int(data["memory_total"]),
            memory_used=int(data["memory_used"]),
            memory_free=int(data["memory_free"]),
            utilization=float(data.get("utilization", 0.0)),
        )


class GpuSource(Protocol):
    """Reads the GPUs it knows; raises OSError (or aiohttp.ClientError) when it cannot."""

    async def read(self) -> list[GpuReading]:
        """Current readings, one per GPU."""
