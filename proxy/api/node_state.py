"""``GET /proxy/node``: what this proxy publishes for a front tier, per model, in a stable schema.

A front in front of several boxes (each an ``ollamux serve``, a *node*) routes a request to the
node where it will start first; the node then binds it to a GPU. This is what the front reads:

.. code-block:: json

    {"schema": 1, "version": "0.1.0", "instances": {"up": 3, "total": 4},
     "models": {"llama3.1:8b": {"held": 4, "warm": 2, "slots": 8, "busy": 5, "free": 3,
                                "queued": 0, "service_s": 9.5, "load_s": 2.4}}}

Per model, over the instances that can take requests now (up, not ejected, not draining):
``held`` instances whose store has it, ``warm`` those that run it, ``slots`` their slots for it,
``busy`` the requests in flight on them, ``free`` the slots a request would start in at once,
``queued`` the requests waiting in this proxy for it, and the learned ``service_s`` (how long a
request holds a slot) and ``load_s`` (how long a load takes here). A front estimates a request's
wait on this node from them. Fields are only ever added within a schema version; a change of
meaning gets a new ``schema``. Same access rule as ``/proxy/status``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.api.context import PROXY, Proxy
from proxy.api.ollama import json_response

SCHEMA = 1


def routes() -> list[web.RouteDef]:
    return [web.get("/proxy/node", node)]


async def node(request: web.Request) -> web.Response:
    return json_response(published(request.app[PROXY]))


def published(proxy: Proxy) -> dict[str, Any]:
    """The node's state as the schema above says; read from the router, no I/O."""
    routable = proxy.router.routable()
    names: set[str] = set()
    for inst in routable:
        names |= set(inst.models or ()) | set(inst.loaded)
    dispatcher = proxy.router.dispatcher
    models = {}
    for name in sorted(names):
        warm = [i for i in routable if i.takes(name)]
        slots = sum(i.slots for i in warm)
        busy = sum(i.inflight.get(name, 0) for i in warm)
        free = sum(max(i.slots - i.inflight.get(name, 0), 0) for i in warm)
        models[name] = {
            "held": sum(1 for i in routable if i.has(name)),
            "warm": len(warm),
            "slots": slots,
            "busy": busy,
            "free": free,
            "queued": dispatcher.depth(name),
            "service_s": round(proxy.book.estimate_service_s(name), 3),
            "load_s": round(proxy.book.estimate_load_s(name), 3),
        }
    return {
        "schema": SCHEMA,
        "version": __version__,
        "instances": {"up": len(routable), "total": len(proxy.instances)},
        "models": models,
    }
