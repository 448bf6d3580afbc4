"""The emulated box's config: its GPUs, the model catalogue and the model of time.

Sections of :class:`proxy.config.Config` (``emulator:``), kept apart from the real fleet's settings;
``proxy.config`` re-exports them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from proxy.config_build import check, unique

__all__ = ["GIB", "EmulatorConfig", "GpuSpec", "ModelSpec"]

GIB = 1024**3


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    """An emulated GPU: its memory and its speed relative to the catalogue's reference GPU."""

    name: str
    memory_gib: float
    speed: float = 1.0
    uuid: str = ""

    def __post_init__(self) -> None:
        check(self.memory_gib > 0, "memory_gib", "must be > 0, e.g. 24")
        check(self.speed > 0, "speed", "must be > 0 (1.0 = the catalogue's reference GPU)")
        if not self.uuid:
            digest = hashlib.sha256(self.name.encode()).hexdigest()
            parts = (digest[:8], digest[8:12], digest[12:16], digest[16:20], digest[20:32])
            uuid = "GPU-" + "-".join(parts)
            object.__setattr__(self, "uuid", uuid)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One model of the emulator's catalogue, with the speeds it reaches on the reference GPU."""

    name: str
    size_gb: float
    parameters: str = "8.0B"
    context_length: int = 131072
    decode_tps: float = 140.0
    prompt_tps: float = 7000.0
    load_gbps: float = 12.0
    kv_kib_per_token: float = 128.0
    family: str = "llama"
    quantization: str = "Q4_K_M"
    embedding: bool = False
    embedding_length: int = 4096
    capabilities: tuple[str, ...] = ()
    pulled: bool = True
    digest: str = ""

    def __post_init__(self) -> None:
        check(self.size_gb > 0, "size_gb", "must be > 0, e.g. 4.9")
        for name in ("decode_tps", "prompt_tps", "load_gbps"):
            check(getattr(self, name) > 0, name, "must be > 0")
        check(self.context_length >= 4, "context_length", "must be >= 4")
        if not self.digest:
            object.__setattr__(self, "digest", hashlib.sha256(self.name.encode()).hexdigest())
        if not self.capabilities:
            caps = ("embedding",) if self.embedding else ("completion", "tools")
            object.__setattr__(self, "capabilities", caps)

    @property
    def size_bytes(self) -> int:
        return int(self.size_gb * 1e9)


@dataclass(frozen=True, kw_only=True)
class EmulatorConfig:
    """The emulated box: its GPUs, the model catalogue and the model of time."""

    speed: float = 1.0
    """Time compression for real-time runs: 10 means a 5 s load takes 0.5 s."""
    gpus: tuple[GpuSpec, ...] = ()
    models: tuple[ModelSpec, ...] = ()
    """Empty means the built-in catalogue (proxy/emulator/catalogue.py)."""
    spread_penalty: float = 0.06
    """Per-token slowdown for each extra GPU a model is split over (0.06 = 6 %)."""
    cpu_slowdown: float = 10.0
    """How much slower a layer runs when it spilled to system RAM."""
    registry_gbps: float = 1.0
    """Download speed of ``/api/pull``."""
    version: str = "0.32.15"
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.speed > 0, "speed", "must be > 0, e.g. 1 (real time) or 20")
        check(self.spread_penalty >= 0, "spread_penalty", "must be >= 0, e.g. 0.06")
        check(self.cpu_slowdown >= 1, "cpu_slowdown", "must be >= 1")
        check(self.registry_gbps > 0, "registry_gbps", "must be > 0")
        unique([g.name for g in self.gpus], "gpus", "name")
        unique([m.name for m in self.models], "models", "name")
