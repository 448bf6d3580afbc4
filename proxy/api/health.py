"""Health probes for orchestrators: ``GET /proxy/live`` and ``GET /proxy/ready``.

- ``/proxy/live``: 200 ``{"status": "live"}`` whenever the process answers HTTP. It never looks
  at the instances: an instance being down is no reason to restart the proxy (that would cut the
  streams the other instances serve). Draining after SIGTERM, it still answers 200.
- ``/proxy/ready``: 200 ``{"status": "ready", "routable": N, "instances": M}`` when at least one
  instance can take a request now (up, not ejected, not draining); else 503 with Ollama's error
  shape plus the same counts, so a Service or a load balancer sends no client here meanwhile.
  During the graceful stop's drain (``api/stopping.py``) it answers 503 "stopping".

Both are cheap (no upstream call: they read the monitor's last view) and open without an API key,
even with ``auth.protect_status`` (probes carry no keys; they tell nothing but two counts).
The stopping gate lets them through while it refuses everything else (:data:`PATHS`); note that
once the listening socket has closed, only connections that were already open reach them.
"""

from __future__ import annotations

from aiohttp import web

from proxy.api.context import PROXY
from proxy.api.ollama import json_response
from proxy.api.stopping import GATE, PROBES

__all__ = ["NOT_READY", "PATHS", "STOPPING", "routes"]

PATHS = PROBES
"""The probe paths (the stopping gate and the key check let them through)."""
NOT_READY = "no instance can serve yet"
STOPPING = "the proxy is stopping and takes no new requests"


def routes() -> list[web.RouteDef]:
    return [web.get("/proxy/live", live), web.get("/proxy/ready", ready)]


async def live(request: web.Request) -> web.Response:
    """200 while the process serves; instances are not looked at."""
    return json_response({"status": "live"})


async def ready(request: web.Request) -> web.Response:
    """200 when an instance can serve now; 503 when none can, or while the proxy drains."""
    proxy = request.app[PROXY]
    routable = len(proxy.router.routable())
    counts = {"routable": routable, "instances": len(proxy.instances)}
    gate = request.app.get(GATE)
    if gate is not None and gate.closed:
        return json_response({"error": STOPPING, "status": "stopping", **counts}, status=503)
    if not routable:
        return json_response({"error": NOT_READY, "status": "not ready", **counts}, status=503)
    return json_response({"status": "ready", **counts})
