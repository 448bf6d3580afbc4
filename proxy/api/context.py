"""What every handler shares, under one typed AppKey: the router, the session and friends."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from proxy.balancer.monitor import Monitor
from proxy.balancer.router import Router
from proxy.balancer.state import InstanceState, ModelBook
from proxy.config import Config
from proxy.forward import Exchange
from proxy.metrics import Metrics

RECENT_REQUESTS = 20


@dataclass(eq=False)
class Proxy:
    """The proxy's live parts; built in ``app.py``'s cleanup context, used by the handlers."""

    config: Config
    instances: list[InstanceState]
    book: ModelBook
    router: Router
    metrics: Metrics
    model_label: Callable[[str], str]
    session: aiohttp.ClientSession | None = None
    monitor: Monitor | None = None
    pulls: dict[str, Any] = field(default_factory=dict)
    """Pulls in progress by model (see api/pull.py)."""
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_REQUESTS))
    """The last requests answered, as ``/proxy/status`` lists them (see api/access.py)."""
    started_at: float = field(default_factory=time.time)

    def client(self) -> aiohttp.ClientSession:
        assert self.session is not None, "used outside the app's lifetime"
        return self.session

    def exchange(self, inst: InstanceState) -> Exchange:
        """A new exchange with ``inst`` over the pooled session (see ``proxy/forward.py``)."""
        return Exchange(self.client(), inst, connect=self.config.timeouts.connect)


PROXY = web.AppKey("proxy", Proxy)
