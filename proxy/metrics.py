"""All Prometheus metrics of ollamux: event counters/histograms and scrape-time live gauges."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Sequence

from aiohttp import web
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.balancer.dispatcher import Dispatcher
from proxy.balancer.state import InstanceState, ModelBook
from proxy.gpu import GpuReading
from proxy.names import model_key

# LLM latencies: 10 ms .. 5 min
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)

ENDPOINTS = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/api/show",
        "/api/pull",
        "/api/push",
        "/api/create",
        "/api/copy",
        "/api/delete",
        "/api/blobs/{digest}",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/v1/models/{model}",
    }
)
"""The ``endpoint`` label's values besides ``other``: the proxy's routes, never a client's path."""
NO_INSTANCE = "none"
"""The ``backend`` label of a request no instance answered (rejected, or failed everywhere)."""
NO_MODEL = "none"
"""The ``model`` label of a request that names no model at all."""
REJECT_REASONS = ("queue_full", "queue_timeout", "no_instance")
"""The ``reason`` values of ``ollamux_rejected_total`` (``error_replies.rejection_reason``)."""
UPSTREAM_KINDS = ("connect", "timeout", "status", "midstream")
"""The ``kind`` values of ``ollamux_upstream_errors_total`` (the ``UpstreamError`` kinds)."""
AUTH_REASONS = ("no_key", "bad_key", "admin", "inference_only", "model")
"""The ``reason`` values of ``ollamux_auth_refused_total`` (proxy/api/auth.py)."""


class Metrics:
    """Counters and histograms for what the proxy does, registered in an injected registry.

    A series about one Ollama server names it in ``backend`` (the instance's configured name):
    ``instance`` is the label Prometheus gives the scraped target, the proxy itself."""

    def __init__(
        self, registry: CollectorRegistry, policy: str, instances: Sequence[str] = ()
    ) -> None:
        # No ``*_created`` series: in the text format Prometheus stores each as one more gauge,
        # doubling every counter's and histogram's series for a timestamp nobody graphs.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.policy = policy
        self.requests = Counter(
            "ollamux_requests",
            "Requests answered, by endpoint, model, instance and HTTP status.",
            ["endpoint", "model", "backend", "code"],
            registry=registry,
        )
        self.decisions = Counter(
            "ollamux_routing_decisions",
            "Routing decisions by policy and reason (queued = no instance could take it yet).",
            ["policy", "reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "ollamux_rejected",
            "Requests refused by admission control.",
            ["reason"],
            registry=registry,
        )
        self.key_requests = Counter(
            "ollamux_key_requests",
            "Requests by API key name (anonymous: no key needed, or no keys configured).",
            ["key"],
            registry=registry,
        )
        self.auth_refused = Counter(
            "ollamux_auth_refused",
            "Requests refused by the API key checks, by reason.",
            ["reason"],
            registry=registry,
        )
        self.retries = Counter(
            "ollamux_retries",
            "Requests retried on another instance before the first byte.",
            registry=registry,
        )
        self.upstream_errors = Counter(
            "ollamux_upstream_errors",
            "Failed exchanges with instances, by kind.",
            ["backend", "kind"],
            registry=registry,
        )
        self.ejections = Counter(
            "ollamux_ejections",
            "Times an instance was taken out of rotation because its requests kept failing.",
            ["backend"],
            registry=registry,
        )
        self.model_loads = Counter(
            "ollamux_model_loads",
            "Requests that made an instance load their model.",
            ["backend", "model"],
            registry=registry,
        )
        self.tokens = Counter(
            "ollamux_tokens",
            "Tokens processed, from the instances' final metrics.",
            ["backend", "model", "kind"],
            registry=registry,
        )
        self.duration = Histogram(
            "ollamux_request_duration_seconds",
            "Time from request to the last byte relayed.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "ollamux_time_to_first_token_seconds",
            "Time from request to the first byte of the answer (queue, load and prompt included).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "ollamux_queue_wait_seconds",
            "Time a request waited in the proxy for a slot.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        build = Gauge(
            "ollamux_build_info",
            "Always 1; the labels say which ollamux and which Python run the proxy.",
            ["version", "python"],
            registry=registry,
        )
        build.labels(__version__, platform.python_version()).set(1)
        self._zero(instances)
        # the proxy's own CPU, memory and file descriptors (process_*), and python_info; a
        # registry of its own gets its own collectors, so several apps in one process never clash
        # (prometheus_client's global registry has them already)
        if registry is not REGISTRY:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)

    def _zero(self, instances: Sequence[str]) -> None:
        """A series at 0 for every label value known at start (all of them fixed, short lists),
        so a dashboard shows 0 rather than "No data" and ``increase()`` sees the first event."""
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for reason in AUTH_REASONS:
            self.auth_refused.labels(reason)
        for name in instances:
            for kind in UPSTREAM_KINDS:
                self.upstream_errors.labels(name, kind)

    def decision(self, reason: str) -> None:
        self.decisions.labels(self.policy, reason).inc()


class LiveCollector(Collector):
    """Gauges read from the dispatcher's state at scrape time; nothing is kept between scrapes."""

    def __init__(self, dispatcher: Dispatcher, book: ModelBook) -> None:
        self._dispatcher = dispatcher
        self._book = book

    def collect(self) -> Iterable[Metric]:
        instances = list(self._dispatcher.instances.values())
        up = GaugeMetricFamily(
            "ollamux_instance_up", "1 if the instance passes its health check.", labels=["backend"]
        )
        inflight = GaugeMetricFamily(
            "ollamux_inflight", "Requests in flight per instance.", labels=["backend"]
        )
        slots = GaugeMetricFamily(
            "ollamux_slots", "Slots per loaded model (num_parallel).", labels=["backend"]
        )
        loaded = GaugeMetricFamily(
            "ollamux_model_loaded",
            "1 per model loaded on an instance.",
            labels=["backend", "model"],
        )
        in_vram = GaugeMetricFamily(
            "ollamux_model_vram_ratio",
            "Share of a loaded model in GPU memory (size_vram / size in /api/ps); below 1 it "
            "spilled to CPU memory and runs slower.",
            labels=["backend", "model"],
        )
        ejected = GaugeMetricFamily(
            "ollamux_instance_ejected",
            "1 while the instance is ejected: its requests kept failing; a probe re-admits it.",
            labels=["backend"],
        )
        for inst in instances:
            up.add_metric([inst.name], 1.0 if inst.healthy else 0.0)
            ejected.add_metric([inst.name], 1.0 if inst.ejected else 0.0)
            inflight.add_metric([inst.name], inst.inflight_total())
            slots.add_metric([inst.name], inst.slots)
            for model, info in sorted(inst.loaded.items()):
                loaded.add_metric([inst.name, model], 1.0)
                if info.size > 0:  # 0: the proxy loaded it, /api/ps has not said yet
                    in_vram.add_metric([inst.name, model], min(info.size_vram / info.size, 1.0))
        depth = GaugeMetricFamily(
            "ollamux_queue_depth", "Requests waiting in the proxy, by model.", labels=["model"]
        )
        for model, n in sorted(self._dispatcher.depths(empty=True).items()):
            depth.add_metric([model], n)
        yield from (up, ejected, inflight, slots, loaded, in_vram, depth)
        yield from gpu_families(instances)


def gpu_families(instances: Sequence[InstanceState]) -> list[GaugeMetricFamily]:
    """Memory and utilization of every GPU, as the monitor last read them from the GPU sources."""
    labels = ["gpu", "uuid"]
    total = GaugeMetricFamily("ollamux_gpu_memory_total_bytes", "GPU memory.", labels=labels)
    used = GaugeMetricFamily("ollamux_gpu_memory_used_bytes", "GPU memory in use.", labels=labels)
    free = GaugeMetricFamily("ollamux_gpu_memory_free_bytes", "GPU memory free.", labels=labels)
    util = GaugeMetricFamily(
        "ollamux_gpu_utilization_ratio",
        "Share of the last sample period the GPU was computing (0..1).",
        labels=["gpu"],
    )
    for gpu, reading in gpu_readings(instances):
        total.add_metric([gpu, reading.uuid], reading.memory_total)
        used.add_metric([gpu, reading.uuid], reading.memory_used)
        free.add_metric([gpu, reading.uuid], reading.memory_free)
        util.add_metric([gpu], reading.utilization)
    return [total, used, free, util]


def gpu_readings(instances: Sequence[InstanceState]) -> list[tuple[str, GpuReading]]:
    """Each GPU's last reading once, with its ``gpu`` label.

    ``gpu`` is the host-wide index where the config knows it (emulated GPUs), else the index the
    GPU source reports; should two GPUs still share one (remote hosts), the instance name qualifies
    it, so no two series ever collide. A GPU seen by several instances is reported once.
    """
    out: list[tuple[str, GpuReading]] = []
    seen: set[str] = set()
    taken: set[str] = set()
    for inst in instances:
        for reading in inst.gpus:
            if reading.uuid in seen:
                continue
            seen.add(reading.uuid)
            gpu = inst.gpu_labels.get(reading.uuid, str(reading.index))
            if gpu in taken:
                gpu = f"{inst.name}:{reading.index}"
            taken.add(gpu)
            out.append((gpu, reading))
    return out


def model_label(book: ModelBook) -> Callable[[str], str]:
    """Bounded label values: a model no instance lists counts as ``other``."""

    def label(model: str) -> str:
        if not model:
            return NO_MODEL
        return model_key(model) if book.known(model) else "other"

    return label


def endpoint_label(request: web.Request) -> str:
    """The route a request matched, from a fixed set, else ``other`` (unknown paths make none)."""
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else ""
    return canonical if canonical in ENDPOINTS else "other"
