"""What the router knows about each instance: health, loaded models, slots, in-flight, VRAM.

``InstanceState`` is mutable and written only by the router (``balancer/router.py``, with its
dispatcher and outlier ejection) and the monitor; policies never see it.
They see ``InstanceView``, a frozen snapshot made for one decision, so that a policy is a pure
function that tests can feed by hand.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from proxy.gpu import GpuReading
from proxy.names import model_key

GIB = 1024**3
_EWMA = 0.2
RECENT = 50
"""Times to first token kept per instance for ``/proxy/status``."""


class Outcome(str, enum.Enum):
    """How one request on one instance ended; the last four count against the instance."""

    OK = "ok"
    """The instance answered (a 4xx included: that is the request's fault, not the instance's)."""
    CLIENT_GONE = "client_gone"
    CONNECT = "connect"
    TIMEOUT = "timeout"
    STATUS = "status"
    MIDSTREAM = "midstream"


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A model an instance has loaded, as its ``/api/ps`` says."""

    name: str
    size_vram: int
    context_length: int
    size: int = 0
    """All the bytes it takes; more than ``size_vram`` when part of it spilled to CPU memory."""


@dataclass(kw_only=True)
class InstanceState:
    """The router's live picture of one Ollama server."""

    name: str
    url: str
    slots: int
    """OLLAMA_NUM_PARALLEL: parallel sequences per loaded model."""
    api_key: str = field(default="", repr=False)
    """Sent as ``Authorization: Bearer`` on everything sent there, in place of the client's."""
    capacity: dict[str, int] | None = None
    """For a node (another ollamux): the requests per model this proxy may have in flight there,
    from what the node last published; None for an Ollama server (``slots`` per model)."""
    gpu_uuids: tuple[str, ...] = ()
    healthy: bool = False
    """False until the first health check answers."""
    draining: bool = False
    failures: int = 0
    """Failed health checks in a row."""
    strikes: int = 0
    """Failed requests in a row (see ``balancer/outlier.py``)."""
    ejected: bool = False
    """Outlier ejection keeps requests away until a real probe passes after ``ejected_until``."""
    ejected_until: float = 0.0
    ejections: int = 0
    """Ejections since it last served cleanly: each one doubles the next back-off."""
    store: str = ""
    """The model store it reads: instances with the same store hold the same models."""
    models: frozenset[str] | None = None
    """The models its store holds (its ``/api/tags``, by :func:`~proxy.names.model_key`); None
    until first read."""
    loaded: dict[str, LoadedModel] = field(default_factory=dict)
    loading: dict[str, int] = field(default_factory=dict)
    """Models the proxy sent a cold request for, not yet seen in /api/ps -> reserved bytes."""
    preloading: set[str] = field(default_factory=set)
    """Of ``loading``, replicas loading in the background with no request bound: requests go
    there once the model is loaded, not to wait for the load."""
    inflight: dict[str, int] = field(default_factory=dict)
    memory_total: int = 0
    memory_free: int | None = None
    """Bytes free over the instance's GPUs; None until the GPU source answered."""
    memory_source: str = ""
    """Where its memory comes from: ``nvml``, ``agent``, ``emulator`` (readings), ``memory_gib``
    (configured size, use estimated from /api/ps), ``learned`` (the most it held at once)."""
    memory_capacity: int = 0
    """Bytes of GPU memory, configured or learned, for an instance without readings."""
    slots_assumed: bool = False
    """``slots`` is a default, not the server's known OLLAMA_NUM_PARALLEL."""
    utilization: float = 0.0
    gpus: tuple[GpuReading, ...] = ()
    """What the GPU source last read for this instance's GPUs; empty while it is down."""
    gpu_labels: dict[str, str] = field(default_factory=dict)
    """GPU uuid -> the ``gpu`` metric label, where the config knows the GPU's host-wide index."""
    version: str = ""
    recent_ttft: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    reasons: dict[str, int] = field(default_factory=dict)
    """Requests bound here, by the policy's reason (for ``/proxy/status``)."""
    decode_tps: dict[str, float] = field(default_factory=dict)
    """Tokens per second it generated each model at (from answers' final lines, averaged)."""
    relative_speed: float = 0.0
    """Its decode speed against the fastest instance's for the same models (1.0 = the fastest;
    0 = not learned yet): what it is likely to do with a model it never ran."""

    @property
    def state(self) -> str:
        """``down``, ``draining`` or ``up``, as status pages show it."""
        if not self.healthy:
            return "down"
        if self.ejected:
            return "ejected"
        return "draining" if self.draining else "up"

    @property
    def routable(self) -> bool:
        """New requests may go there: it answers, is not ejected and is not draining."""
        return self.healthy and not self.ejected and not self.draining

    def inflight_total(self) -> int:
        return sum(self.inflight.values())

    def is_warm(self, model: str) -> bool:
        return model in self.loaded or model in self.loading

    def auth(self) -> dict[str, str]:
        """The header its ``api_key`` asks for, or none."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def slots_for(self, model: str) -> int:
        """Requests for ``model`` that may run here at once."""
        if self.capacity is None:
            return self.slots
        return self.capacity.get(model, 0)

    def takes(self, model: str, num_ctx: int = 0, max_ctx: int = 0) -> bool:
        """Requests for ``model`` may be bound here: it is loaded, or a request waits for its load
        (not a replica loading in the background); with ``num_ctx``, loaded with that context, as
        far as /api/ps tells (``max_ctx``: the largest context seen for the model, which a larger
        ``num_ctx`` is clamped to), since another context makes Ollama reload it."""
        if not self.is_warm(model) or model in self.preloading:
            return False
        loaded = self.loaded.get(model)
        if not num_ctx or loaded is None or not loaded.context_length:
            return True
        ctx = loaded.context_length
        return ctx == num_ctx or (num_ctx > ctx and ctx >= max_ctx)

    def has(self, model: str) -> bool:
        """Its store holds ``model`` (or may: its list was not read yet), or it runs it."""
        return self.models is None or model in self.models or self.is_warm(model)

    def free_vram(self) -> int | None:
        """Free memory less what loads in flight will take (the GPU source cannot see them yet).

        Without readings: the configured or learned capacity less what /api/ps shows loaded;
        None when nothing tells.
        """
        if self.memory_free is not None:
            return self.memory_free - sum(self.loading.values())
        if not self.memory_capacity:
            return None
        used = sum(m.size_vram for m in self.loaded.values()) + sum(self.loading.values())
        return self.memory_capacity - used

    def lacks(self) -> list[str]:
        """The routing signals this instance does not give (for status pages)."""
        if self.capacity is not None:
            return []  # a node publishes what it can take; its own GPUs are its business
        missing = []
        if self.memory_free is None and not self.memory_capacity:
            missing.append("gpu memory")
        elif self.memory_free is None:
            missing.append(f"gpu memory readings ({self.memory_source})")
        if self.slots_assumed:
            missing.append("num_parallel")
        return missing

    def speed_for(self, model: str, fastest: float) -> float:
        """How fast it runs ``model`` against the fastest instance (``fastest`` tokens/s); 1.0
        while nothing is known."""
        tps = self.decode_tps.get(model, 0.0)
        if tps and fastest:
            return tps / fastest
        return self.relative_speed or 1.0

    def observe_decode(self, model: str, tps: float) -> None:
        old = self.decode_tps.get(model, 0.0)
        self.decode_tps[model] = tps if not old else _ewma(old, tps)

    def view(
        self,
        model: str,
        *,
        slots: int,
        affinity: bool,
        num_ctx: int = 0,
        max_ctx: int = 0,
        speed: float = 1.0,
    ) -> InstanceView:
        busy_models = {m for m, n in self.inflight.items() if n > 0}
        node = self.capacity is not None  # it places models on its own GPUs: never "full"
        return InstanceView(
            name=self.name,
            slots=slots,
            inflight=self.inflight_total(),
            inflight_model=self.inflight.get(model, 0),
            warm=self.takes(model, num_ctx, max_ctx),
            loading=bool(self.loading) and not node,
            free_vram=self.free_vram(),
            idle_models=0 if node else len(set(self.loaded) - busy_models),
            loaded_models=0 if node else len(self.loaded) + len(self.loading),
            affinity=affinity,
            speed=speed,
        )


@dataclass(frozen=True, kw_only=True)
class InstanceView:
    """One healthy instance as a policy sees it for one request."""

    name: str
    slots: int
    """Slots this instance has for the requested model."""
    inflight: int
    """Requests the proxy has in flight on this instance, all models."""
    inflight_model: int
    warm: bool
    """The model is loaded there, or the proxy is loading it there."""
    loading: bool
    """Some model is loading there; Ollama loads one model at a time, so it counts as busy."""
    free_vram: int | None
    idle_models: int
    """Loaded models with nothing in flight: what an eviction would cost least."""
    loaded_models: int = 0
    """Models loaded or loading there: each competes with a new one for the GPU's compute."""
    affinity: bool = False
    """The request's session last ran here (its prompt cache is warm)."""
    speed: float = 1.0
    """How fast it generates this model against the fastest instance (learned; 1.0 unknown)."""

    @property
    def available(self) -> bool:
        """A slot is free for the model: the request starts there as soon as the model is loaded,
        never behind other requests inside Ollama."""
        return self.inflight_model < self.slots


@dataclass(frozen=True, kw_only=True)
class RouteRequest:
    """What a policy needs to know about the request it places."""

    model: str
    est_size: int
    """Estimated bytes the model takes when loaded (learned from /api/ps once seen)."""
    queued_ahead: int = 0
    """Requests for the same model already waiting in the proxy."""
    service_s: float = 10.0
    """Mean time one request of this model holds a slot."""
    load_s: float = 5.0
    """Estimated time to load the model on a new instance."""
    session: str = ""


@dataclass(kw_only=True)
class ModelStats:
    """What the proxy learned about one model from the traffic it relayed."""

    size_vram: int = 0
    """Bytes it needs to run on a GPU: its ``size`` in /api/ps (a spilled copy's ``size_vram``
    is what fitted, not what it needs)."""
    max_ctx: int = 0
    """The largest context /api/ps showed it with: a larger ``num_ctx`` is clamped to it."""
    service_s: float = 0.0
    load_s: float = 0.0
    prompt_tps: float = 0.0
    """Prompt tokens per second from bind to first token, on warm instances (proxy's clock)."""

    def observe_prompt(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        self.prompt_tps = rate if self.prompt_tps == 0 else _ewma(self.prompt_tps, rate)

    def observe_service(self, seconds: float) -> None:
        self.service_s = seconds if self.service_s == 0 else _ewma(self.service_s, seconds)

    def observe_load(self, seconds: float) -> None:
        self.load_s = seconds if self.load_s == 0 else _ewma(self.load_s, seconds)


class ModelBook:
    """Sizes and timings per model, shared by all instances (a model costs the same everywhere)."""

    def __init__(self) -> None:
        self._stats: dict[str, ModelStats] = {}
        self._file_size: dict[str, int] = {}

    def stats(self, model: str) -> ModelStats:
        return self._stats.setdefault(model_key(model), ModelStats())

    def set_file_size(self, model: str, size: int) -> None:
        self._file_size[model_key(model)] = size

    def known(self, model: str) -> bool:
        return model_key(model) in self._file_size

    def known_names(self) -> list[str]:
        return sorted(self._file_size)

    def estimate_size(self, model: str) -> int:
        """Seen size in VRAM, else the file size plus room for KV cache and buffers."""
        key = model_key(model)
        seen = self._stats.get(key)
        if seen is not None and seen.size_vram:
            return seen.size_vram
        size = self._file_size.get(key, 0)
        return int(size * 1.25) + GIB // 2

    def estimate_load_s(self, model: str) -> float:
        """Seen load time, else Ollama's typical 1.5 s plus reading the file at ~5 GB/s."""
        key = model_key(model)
        seen = self._stats.get(key)
        if seen is not None and seen.load_s:
            return seen.load_s
        return 1.5 + self._file_size.get(key, 4 * GIB) / 5e9

    def estimate_service_s(self, model: str) -> float:
        seen = self._stats.get(model_key(model))
        return seen.service_s if seen is not None and seen.service_s else 10.0


def _ewma(old: float, new: float) -> float:
    return (1 - _EWMA) * old + _EWMA * new
