"""Loads a model on an instance in the background, for a replica the router wants (scale-out).

A load is what Ollama does for a generation with no prompt: it loads the model and answers at
once (``done_reason: load``); an embedding model, which refuses generations, loads with a one-word
embedding instead. ``keep_alive`` is left to the instance's own setting.
"""

from __future__ import annotations

import json

from proxy.api.context import Proxy
from proxy.api.error_replies import error_text
from proxy.balancer.state import InstanceState
from proxy.errors import UpstreamError

_HEADERS = {"Content-Type": "application/json"}


async def load(proxy: Proxy, inst: InstanceState, model: str, deadline: float) -> str | None:
    """Load ``model`` on ``inst`` within ``deadline`` seconds: None when it is loaded, else why
    not (the instance's error, or that it could not be reached)."""
    why = await _ask(proxy, inst, "/api/generate", {"model": model}, deadline)
    if why is not None and "does not support generate" in why:
        why = await _ask(proxy, inst, "/api/embed", {"model": model, "input": "hi"}, deadline)
    return why


async def _ask(
    proxy: Proxy, inst: InstanceState, path: str, body: dict[str, str], deadline: float
) -> str | None:
    exchange = proxy.exchange(inst)
    try:
        resp = await exchange.open(
            "POST", path, _HEADERS, json.dumps(body).encode(), first=deadline, idle=deadline
        )
        answer = await resp.read()
    except UpstreamError as exc:
        return exc.message
    finally:
        exchange.close()
    if resp.status >= 300:
        return f"answered {resp.status}: {error_text(answer, limit=200)}"
    return None
