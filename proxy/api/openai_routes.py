"""Ollama's OpenAI-compatible API (/v1) through the proxy: routed calls, merged model list."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.api import relay
from proxy.api.context import PROXY
from proxy.api.ollama import fan_out, json_response
from proxy.api.passthrough import passthrough


def routes() -> list[web.RouteDef]:
    return [
        web.post("/v1/chat/completions", relay.handle),
        web.post("/v1/completions", relay.handle),
        web.post("/v1/embeddings", relay.handle),
        web.post("/v1/responses", relay.handle),
        web.post("/v1/messages", relay.handle),
        web.get("/v1/models", models),
        web.get("/v1/models/{model}", passthrough),
    ]


async def models(request: web.Request) -> web.Response:
    """Every instance's models, one entry per id."""
    proxy = request.app[PROXY]
    seen: dict[str, dict[str, Any]] = {}
    for _inst, data in await fan_out(proxy, "/v1/models"):
        for entry in data.get("data") or []:
            seen.setdefault(str(entry.get("id", "")), entry)
    return json_response({"object": "list", "data": list(seen.values())})
