"""The proxy's own endpoints: /proxy/status (what the router sees), /metrics and the probes.

The health probes ``/proxy/live`` and ``/proxy/ready`` are in ``api/health.py``.

``/proxy/status`` is the JSON that ``ollamux status`` renders (commands/status.py): per instance its
health, GPUs with memory, loaded models, slots, in-flight requests, recent time to first token and
the reasons requests were bound to it; the queues per model; the policy; the last requests.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from proxy import __version__, eventloop
from proxy.api import health, node_state
from proxy.api.context import PROXY
from proxy.api.ollama import json_response
from proxy.balancer.state import InstanceState
from proxy.metrics import gpu_readings


def routes(registry: CollectorRegistry) -> list[web.RouteDef]:
    return [
        web.get("/proxy/status", status),
        web.get("/metrics", make_aiohttp_handler(registry)),
        *health.routes(),
        *node_state.routes(),
    ]


async def status(request: web.Request) -> web.Response:
    """Instances, queues per model, queue limits, policy and the last requests answered."""
    proxy = request.app[PROXY]
    dispatcher = proxy.router.dispatcher
    gpus = {reading.uuid: gpu for gpu, reading in gpu_readings(proxy.instances)}
    limits = proxy.config.queue
    return json_response(
        {
            "version": __version__,
            "uptime_s": round(time.time() - proxy.started_at, 1),
            "event_loop": eventloop.name(),
            "policy": proxy.config.routing.policy,
            "queues": dispatcher.depths(),
            "queued": dispatcher.depth(),
            "queue_limits": {
                "max_per_model": limits.max_per_model,
                "max_total": limits.max_total,
                "timeout": limits.timeout,
            },
            "instances": [
                instance(inst, gpus, ejected_for=proxy.router.outliers.seconds_left(inst))
                for inst in proxy.instances
            ],
            "recent": list(reversed(proxy.recent)),
        }
    )


def instance(
    inst: InstanceState, gpu_labels: dict[str, str], *, ejected_for: float | None = None
) -> dict[str, Any]:
    """One instance's entry; ``ejected_for``: seconds left of its ejection's back-off."""
    return {
        "name": inst.name,
        "url": inst.url,
        "state": inst.state,
        "healthy": inst.healthy,
        "draining": inst.draining,
        "ejected": inst.ejected,
        "ejected_until": None if ejected_for is None else round(time.time() + ejected_for, 1),
        "ejections": inst.ejections,
        "strikes": inst.strikes,
        "version": inst.version,
        "gpus": [
            {
                "gpu": gpu_labels.get(g.uuid, str(g.index)),
                "uuid": g.uuid,
                "name": g.name,
                "memory_total": g.memory_total,
                "memory_used": g.memory_used,
                "memory_free": g.memory_free,
                "utilization": g.utilization,
            }
            for g in inst.gpus
        ],
        "gpu_uuids": list(inst.gpu_uuids),
        "memory_total": inst.memory_total,
        "memory_free": inst.memory_free,
        "memory_source": inst.memory_source,
        "memory_capacity": inst.memory_capacity,
        "free_estimate": inst.free_vram(),
        "lacks": inst.lacks(),
        "store": inst.store,
        "models": sorted(inst.models or ()),
        "utilization": inst.utilization,
        "slots": inst.slots,
        "slots_assumed": inst.slots_assumed,
        "inflight": dict(sorted(inst.inflight.items())),
        "inflight_total": inst.inflight_total(),
        "loaded": [
            {"name": m.name, "size_vram": m.size_vram, "context_length": m.context_length}
            for m in sorted(inst.loaded.values(), key=lambda m: m.name)
        ],
        "loading": sorted(inst.loading),
        "ttft": ttft_summary(list(inst.recent_ttft)),
        "reasons": dict(sorted(inst.reasons.items())),
    }


def ttft_summary(samples: Sequence[float]) -> dict[str, Any]:
    """Median, p95 and last of the recent times to first token (seconds), None when none yet."""
    if not samples:
        return {"count": 0, "p50": None, "p95": None, "last": None}
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "count": len(samples),
        "p50": round(statistics.median(ordered), 4),
        "p95": round(p95, 4),
        "last": round(samples[-1], 4),
    }
