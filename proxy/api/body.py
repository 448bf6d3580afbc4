"""Request bodies: read them within ``limits.max_body``, and parse them without stalling the loop.

A body is refused with 413 as soon as its ``Content-Length`` says it is over the limit (the
:func:`limit_middleware` does that at the edge for every route, :func:`read_body` again for its
callers), or as soon as a chunked body grows past it. ``/api/blobs`` uploads are streamed to an
instance and have no limit (see ``api/blobs.py``).

JSON is parsed on the event loop only when the body is small (:data:`OFF_LOOP`); a larger one is
parsed in a worker thread. CPython's JSON parser holds the GIL, so in that thread every JSON object
is built by a Python-level hook, which gives the interpreter a point to switch back to the event
loop; long strings enter the conversation key by their SHA-256, since hashing releases the GIL and
encoding JSON does not. What still holds the loop is the scan of one very long string or of an
array of millions of bare numbers (on the order of 100 ms for 60 MB).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestPayloadError

from proxy.api.context import PROXY
from proxy.assemble import wants_stream
from proxy.errors import BodyIncomplete, BodyTimeout, BodyTooLarge
from proxy.units import format_bytes

__all__ = [
    "OFF_LOOP",
    "READ_BODY",
    "SESSION_HEADER",
    "ModelRequest",
    "limit_middleware",
    "off_loop",
    "parse_json",
    "parse_model_request",
    "read_body",
    "request_body",
    "stalled",
    "too_large",
]

T = TypeVar("T")

OFF_LOOP = 256 * 1024
"""Bodies larger than this (bytes) are parsed, hashed and re-encoded in a worker thread."""
LONG_STRING = 64 * 1024
"""Strings longer than this (characters) count in the conversation key by their digest."""
SESSION_HEADER = "X-OpenWebUI-Chat-Id"
READ_BODY = web.RequestKey("read_body", bytes)
"""The body, once a middleware has read it whole (the API key checks do, for model limits)."""
UNLIMITED = ("/api/blobs/",)
"""Path prefixes whose POST bodies stream to an instance and are not held to ``max_body``."""


@dataclass(frozen=True)
class ModelRequest:
    """The little the proxy reads from a request body to route it."""

    model: str
    session: str
    """Open WebUI's chat id, else a hash of the conversation up to its first user turn."""
    unload: bool
    """An empty prompt with keep_alive 0: Ollama's way to unload a model."""
    stream: bool = False
    """Whether Ollama would stream its answer (its default per path, or the body's ``stream``)."""
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The parsed body."""
    num_ctx: int = 0
    """``options.num_ctx`` when the request sets it: a loaded model with another context would
    be reloaded for it; 0 = not set (any context serves)."""


def too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(
        f"request body is larger than the proxy's limit of {format_bytes(limit)} "
        f"({limit} bytes); raise limits.max_body in the ollamux config to accept it"
    )


def stalled(idle: float) -> BodyTimeout:
    return BodyTimeout(
        f"the request body stalled for {idle:g} s; the proxy waits limits.client_idle "
        "(in the ollamux config) for each part of it"
    )


async def read_body(request: web.BaseRequest, limit: int, *, idle: float | None = None) -> bytes:
    """The whole body, refused (BodyTooLarge, 413) once it is known to be over ``limit`` bytes.

    ``Content-Length`` is checked before anything is read; a chunked body is counted as it comes.
    ``idle``: longest wait for the next piece of the body (BodyTimeout, 408); None waits as long
    as the client stays connected. A body cut short raises BodyIncomplete (400).
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise too_large(limit)
    stream = request.content
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await asyncio.wait_for(stream.readany(), idle)
        except asyncio.TimeoutError:
            assert idle is not None
            raise stalled(idle) from None
        except RequestPayloadError:
            raise BodyIncomplete("the request body ended before it was complete") from None
        except ConnectionResetError:  # the client left: end quietly, as a cancelled handler
            raise asyncio.CancelledError from None
        if not chunk:
            return await off_loop(size, b"".join, chunks)  # a large join lets the loop run
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)


async def request_body(request: web.Request) -> bytes:
    """:func:`read_body` with the proxy's own ``limits.max_body`` and ``limits.client_idle``;
    a body a middleware already read (:data:`READ_BODY`) is not read again."""
    if READ_BODY in request:
        return request[READ_BODY]
    limits = request.app[PROXY].config.limits
    return await read_body(request, limits.max_body, idle=limits.client_idle)


@web.middleware
async def limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The edge: a declared body over ``limits.max_body`` is refused before any handler runs."""
    declared = request.content_length
    if declared is not None and not (
        request.method == "POST" and request.path.startswith(UNLIMITED)
    ):
        limit = request.app[PROXY].config.limits.max_body
        if declared > limit:
            raise too_large(limit)
    return await handler(request)


async def off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` inline when ``size`` (the bytes it works on) is small, else in a thread."""
    if size <= OFF_LOOP:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Each JSON object, built in Python so a parse in a worker thread lets the event loop run."""
    return dict(pairs)


def _loads(body: bytes) -> Any:
    return json.loads(body, object_pairs_hook=_object)


async def parse_json(body: bytes) -> Any:
    """``json.loads(body)``, off the event loop for a large body; ValueError if it is not JSON."""
    if len(body) <= OFF_LOOP:
        return json.loads(body)
    return await asyncio.to_thread(_loads, body)


async def parse_model_request(
    body: bytes, headers: Mapping[str, str], path: str = ""
) -> ModelRequest | None:
    """The model and session of a JSON body, or None when the body is for the instance to judge.

    ``path`` decides whether the answer streams by default (``/api/chat`` does, ``/v1/...`` not).
    Parsing and the conversation hash run in a worker thread for a large body.
    """
    session = headers.get(SESSION_HEADER, "")
    if len(body) <= OFF_LOOP:
        return _model_request(body, session, path, json.loads)
    return await asyncio.to_thread(_model_request, body, session, path, _loads)


def _model_request(
    body: bytes, session: str, path: str, loads: Callable[[bytes], Any]
) -> ModelRequest | None:
    try:
        data = loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested too deep for the parser
        return None
    if not isinstance(data, dict):
        return None
    model = data.get("model")
    if not isinstance(model, str) or not model:
        return None
    messages = data.get("messages")
    if not session and isinstance(messages, list) and messages:
        session = _conversation_key(model, messages)
    empty = not data.get("prompt") and not messages
    keep_alive = data.get("keep_alive")
    unload = empty and keep_alive in (0, "0", "0s", 0.0) and "input" not in data
    return ModelRequest(
        model=model,
        session=session,
        unload=unload,
        stream=wants_stream(path, data),
        data=data,
        num_ctx=_num_ctx(data),
    )


def _num_ctx(data: dict[str, Any]) -> int:
    options = data.get("options")
    value = options.get("num_ctx") if isinstance(options, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _conversation_key(model: str, messages: list[Any]) -> str:
    """Messages up to the first user turn: the same for every turn of one conversation."""
    head = []
    for message in messages:
        head.append(message)
        if isinstance(message, dict) and message.get("role") == "user":
            break
    key = hashlib.sha256(model.encode())
    try:
        key.update(json.dumps(_digested(head), sort_keys=True, default=str).encode())
    except (ValueError, RecursionError):  # e.g. nested too deep to encode
        return ""
    return key.hexdigest()[:16]


def _digested(value: Any) -> Any:
    """``value`` with each long string (an image, a pasted file) replaced by its SHA-256: hashing
    lets other threads run, encoding JSON does not."""
    if isinstance(value, str):
        if len(value) <= LONG_STRING:
            return value
        return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    if isinstance(value, dict):
        return {k: _digested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_digested(v) for v in value]
    return value
