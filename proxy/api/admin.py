"""The proxy's own endpoints: /proxy/status (what the router sees) and /metrics."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from proxy.api.context import PROXY
from proxy.api.ollama import json_response


def routes(registry: CollectorRegistry) -> list[web.RouteDef]:
    return [
        web.get("/proxy/status", status),
        web.get("/metrics", make_aiohttp_handler(registry)),
    ]


async def status(request: web.Request) -> web.Response:
    """Instances with health, GPU memory, loaded models, slots and in-flight; queues; policy."""
    proxy = request.app[PROXY]
    dispatcher = proxy.dispatcher
    return json_response(
        {
            "policy": proxy.config.routing.policy,
            "queues": dispatcher.depths(),
            "instances": [
                {
                    "name": inst.name,
                    "url": inst.url,
                    "healthy": inst.healthy,
                    "draining": inst.draining,
                    "gpus": list(inst.gpu_uuids),
                    "memory_total": inst.memory_total,
                    "memory_free": inst.memory_free,
                    "utilization": inst.utilization,
                    "slots": inst.slots,
                    "inflight": dict(inst.inflight),
                    "loaded": sorted(inst.loaded),
                    "loading": sorted(inst.loading),
                }
                for inst in proxy.instances
            ],
        }
    )
