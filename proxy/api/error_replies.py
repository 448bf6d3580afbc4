"""Error bodies as Ollama writes them, and the one middleware that turns our errors into HTTP."""

from __future__ import annotations

import json
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.api.body import too_large
from proxy.api.context import PROXY
from proxy.errors import OllamuxError, QueueFull, QueueTimeout, RequestRefused, RoutingError

log = logging.getLogger("ollamux.access")

_OPENAI_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
}


INTERNAL = "internal error in the proxy; its log has the details"
"""The only text a client reads for an error the proxy did not expect: no internals."""


def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(path: str, status: int, message: str) -> bytes:
    """``{"error": msg}`` natively; OpenAI's error object under /v1 (ollama.md §4, §5)."""
    if is_openai(path):
        payload: object = {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "api_error"),
                "param": None,
                "code": None,
            }
        }
    else:
        payload = {"error": message}
    return json.dumps(payload, separators=(",", ":")).encode()


def error_response(
    path: str, status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(path, status, message),
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def rejection_reason(exc: RoutingError) -> str:
    """The ``reason`` label of ``ollamux_rejected_total`` (and the access line) for a 503."""
    if isinstance(exc, QueueFull):
        return "queue_full"
    if isinstance(exc, QueueTimeout):
        return "queue_timeout"
    return "no_instance"


def refused(request: web.Request, status: int, message: str) -> web.Response:
    """A 4xx for a request the proxy will not take; the connection closes after it, since the
    rest of the client's body may still be on its way."""
    log.warning("refused %s %s with %d: %s", request.method, request.path, status, message)
    response = error_response(request.path, status, message)
    response.force_close()
    return response


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The seam: RoutingError -> 503 + Retry-After; RequestRefused -> its 4xx (413, 408, 400);
    aiohttp's 404/405 -> Ollama's plain texts."""
    try:
        return await handler(request)
    except RoutingError as exc:  # the access line (api/access.py) already told why
        request.app[PROXY].metrics.rejected.labels(rejection_reason(exc)).inc()
        headers = {"Retry-After": str(exc.retry_after)}
        return error_response(request.path, 503, exc.message, headers)
    except RequestRefused as exc:  # a body over limits.max_body, stalled or cut short
        return refused(request, exc.status, exc.message)
    except web.HTTPRequestEntityTooLarge:  # request.read() past client_max_size (= max_body)
        error = too_large(request.app[PROXY].config.limits.max_body)
        return refused(request, error.status, error.message)
    except web.HTTPMethodNotAllowed:
        return web.Response(status=405, text="405 method not allowed")
    except web.HTTPNotFound:
        return web.Response(status=404, text="404 page not found")
    except OllamuxError as exc:  # a bug if it gets here: say so without a traceback to the client
        log.exception("unhandled %s", type(exc).__name__)
        return error_response(request.path, 500, INTERNAL)


def error_text(body: bytes, *, limit: int | None = None) -> str:
    """The error an instance's answer carries: its JSON ``error`` (an OpenAI-shaped one's
    ``message``), "" when it names none, else the body itself (its first ``limit`` bytes)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:limit].decode(errors="replace")
    error = data.get("error", "") if isinstance(data, dict) else ""
    if isinstance(error, dict):
        error = error.get("message", "")
    return str(error)
