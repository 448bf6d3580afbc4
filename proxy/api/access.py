"""The access log: one key=value line per request, its requests_total count and status record.

Every request the relay handles (routed, passed through, pulled, unloaded, rejected, cancelled)
gets one ``Access`` when it starts and is finished exactly once by ``accounted``, whatever way it
ends. Values a client chose (model names, paths, request ids) are quoted when they hold anything
but plain name characters, so a line always parses and never spans two lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.api.auth import KEY_NAME
from proxy.api.context import Proxy
from proxy.api.error_replies import rejection_reason
from proxy.api.stopping import GATE
from proxy.balancer.state import InstanceState
from proxy.errors import RoutingError, UpstreamError
from proxy.metrics import NO_INSTANCE, endpoint_label

log = logging.getLogger("ollamux.access")

_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+\-]{1,200}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
_JSON_PEEK = 1 << 20
"""Bodies larger than this are never parsed for a model name (blob uploads)."""
CLIENT_GONE = 499
"""Status logged for a request whose client went away before the whole answer (nginx's code)."""


@dataclass(kw_only=True, eq=False)
class Access:
    """What one request was and what became of it."""

    request_id: str
    method: str
    path: str
    endpoint: str
    """The bounded ``endpoint`` label (see ``proxy.metrics.ENDPOINTS``)."""
    model: str
    """The model as the client named it; empty when it named none."""
    model_label: str
    started: float
    at: float
    """Wall-clock start, for the status page."""
    instance: str = NO_INSTANCE
    reason: str = "-"
    queue_wait: float | None = None
    ttft: float | None = None
    prompt_tokens: int | None = None
    eval_tokens: int | None = None
    status: int = 0
    duration: float = 0.0
    error: str = ""
    key: str = "-"
    """The name of the API key it came with ("-": none needed); logged when there is one."""
    cut: Callable[[], bool] = lambda: False
    """True once a stop is cutting the requests still in flight (see ``api/stopping.py``)."""

    def line(self) -> str:
        fields: list[tuple[str, object]] = [
            ("request_id", self.request_id),
            ("method", self.method),
            ("path", self.path),
            ("model", self.model or "-"),
            ("instance", self.instance),
            ("reason", self.reason),
            ("queue_wait", _seconds(self.queue_wait)),
            ("ttft", _seconds(self.ttft)),
            ("prompt_tokens", "-" if self.prompt_tokens is None else self.prompt_tokens),
            ("eval_tokens", "-" if self.eval_tokens is None else self.eval_tokens),
            ("status", self.status),
            ("duration", _seconds(self.duration)),
        ]
        if self.key != "-":
            fields.append(("key", self.key))
        if self.error:
            fields.append(("error", self.error))
        return " ".join(f"{key}={quote(value)}" for key, value in fields)

    def record(self) -> dict[str, Any]:
        """The request as ``/proxy/status`` lists it under ``recent``."""
        return {
            "at": round(self.at, 3),
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "model": self.model_label,
            "instance": self.instance,
            "reason": self.reason,
            "status": self.status,
            "queue_wait": _round(self.queue_wait),
            "ttft": _round(self.ttft),
            "duration": _round(self.duration),
            "eval_tokens": self.eval_tokens,
        }


def begin(proxy: Proxy, request: web.Request, model: str, *, reason: str = "-") -> Access:
    header = request.headers.get("X-Request-Id", "")
    gate = request.app.get(GATE)
    return Access(
        request_id=header if _REQUEST_ID.fullmatch(header) else uuid.uuid4().hex[:12],
        method=request.method,
        path=request.path,
        endpoint=endpoint_label(request),
        model=model,
        model_label=proxy.model_label(model),
        started=time.monotonic(),
        at=time.time(),
        reason=reason,
        key=request.get(KEY_NAME, "-"),
        cut=(lambda: gate.cutting) if gate is not None else (lambda: False),
    )


@contextlib.contextmanager
def accounted(proxy: Proxy, access: Access) -> Iterator[Access]:
    """Finish ``access`` once however the block ends: count it, remember it, log it."""
    try:
        yield access
    except RoutingError as exc:
        access.status, access.instance = 503, NO_INSTANCE
        access.reason, access.error = rejection_reason(exc), exc.message
        raise
    except asyncio.CancelledError:  # the client went away (aiohttp cancels its handler)
        went_away(access)
        if access.reason == "-":
            access.reason = "cancelled"  # while it waited in the queue
        raise
    except BaseException as exc:
        access.status = access.status or 500
        access.error = access.error or f"{type(exc).__name__}: {exc}"
        raise
    finally:
        access.duration = time.monotonic() - access.started
        code = str(access.status)
        proxy.metrics.requests.labels(
            access.endpoint, access.model_label, access.instance, code
        ).inc()
        proxy.recent.append(access.record())
        log.info("%s", access.line())


def count_failure(
    proxy: Proxy, inst: InstanceState, exc: UpstreamError, *, kind: str | None = None
) -> None:
    """An exchange with ``inst`` failed: count it and say so in the log."""
    proxy.metrics.upstream_errors.labels(inst.name, kind or exc.kind).inc()
    log.warning("instance %s failed: %s", inst.name, exc.message)


def went_away(access: Access) -> None:
    """Record that the answer did not reach its end: the client left, or a stop cut it."""
    access.status = CLIENT_GONE
    access.error = "cut: the proxy stopped" if access.cut() else "the client went away"


def body_model(body: bytes) -> str:
    """The ``model`` (or ``name``) a JSON body names, else ''; large bodies are not parsed."""
    if not body or len(body) > _JSON_PEEK or not body.lstrip().startswith(b"{"):
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    name = data.get("model") or data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else ""


def quote(value: object) -> str:
    """``value`` as is when it is a plain token, else JSON-quoted (escaped, one line, <= 200)."""
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    return json.dumps(text[:200])


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
