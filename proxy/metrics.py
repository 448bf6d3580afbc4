"""All Prometheus metrics of ollamux: event counters/histograms and scrape-time live gauges."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.balancer.queue import Dispatcher
from proxy.balancer.state import ModelBook
from proxy.names import normalize

# LLM latencies: 10 ms .. 5 min
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    """Counters and histograms for what the proxy does, registered in an injected registry."""

    def __init__(self, registry: CollectorRegistry, policy: str) -> None:
        self.policy = policy
        self.requests = Counter(
            "ollamux_requests",
            "Requests answered, by endpoint, model, instance and HTTP status.",
            ["endpoint", "model", "instance", "code"],
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
        self.retries = Counter(
            "ollamux_retries",
            "Requests retried on another instance before the first byte.",
            registry=registry,
        )
        self.upstream_errors = Counter(
            "ollamux_upstream_errors",
            "Failed exchanges with instances, by kind.",
            ["instance", "kind"],
            registry=registry,
        )
        self.model_loads = Counter(
            "ollamux_model_loads",
            "Requests that made an instance load their model.",
            ["instance", "model"],
            registry=registry,
        )
        self.tokens = Counter(
            "ollamux_tokens",
            "Tokens processed, from the instances' final metrics.",
            ["instance", "model", "kind"],
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
            "ollamux_instance_up", "1 if the instance passes its health check.", labels=["instance"]
        )
        inflight = GaugeMetricFamily(
            "ollamux_inflight", "Requests in flight per instance.", labels=["instance"]
        )
        slots = GaugeMetricFamily(
            "ollamux_slots", "Slots per loaded model (num_parallel).", labels=["instance"]
        )
        loaded = GaugeMetricFamily(
            "ollamux_model_loaded",
            "1 per model loaded on an instance.",
            labels=["instance", "model"],
        )
        for inst in instances:
            up.add_metric([inst.name], 1.0 if inst.healthy else 0.0)
            inflight.add_metric([inst.name], inst.inflight_total())
            slots.add_metric([inst.name], inst.slots)
            for model in inst.loaded:
                loaded.add_metric([inst.name, model], 1.0)
        depth = GaugeMetricFamily(
            "ollamux_queue_depth", "Requests waiting in the proxy, by model.", labels=["model"]
        )
        for model, n in self._dispatcher.depths().items():
            depth.add_metric([model], n)
        yield from (up, inflight, slots, loaded, depth)


def model_label(book: ModelBook) -> Callable[[str], str]:
    """Bounded label values: a model no instance lists counts as ``other``."""

    def label(model: str) -> str:
        return normalize(model) if model and book.known(model) else "other"

    return label
