"""API keys at the proxy's door: who may call what (401, 403), counts per key, live key reloads.

Once ``auth.keys_file`` holds a key, every request needs ``Authorization: Bearer KEY`` (the
scheme in any case) and gets 401 with ``WWW-Authenticate: Bearer`` and an Ollama-style error body
(OpenAI's error object under ``/v1``) without one. Open to everyone still:

- ``GET /`` and ``HEAD /`` (health probes), and ``OPTIONS`` (CORS preflights, which the edge
  answers before this middleware sees them);
- ``GET /proxy/live`` and ``/proxy/ready`` (orchestrators' probes, ``api/health.py``), even with
  ``auth.protect_status``: probes carry no keys, and these tell only whether an instance can serve;
- ``GET /proxy/status``, ``/proxy/node``, ``/proxy/instances`` and ``/metrics``, unless
  ``auth.protect_status`` (then a key or the admin token);
- ``GET /proxy/ui`` and its files (``api/ui.py``): they hold no data, and a browser cannot send a
  key when it opens a page; the page reads ``/proxy/status`` under that endpoint's rule, asking
  for a key when it needs one;
- ``POST /proxy/instances/...`` when ``admin_token`` is set: the admin token is its credential
  (see ``api/instance_admin.py``). Without an admin token these need a key without limits.

A key limited to models gets 403 for a request naming another model (in its body, or the path of
``/v1/models/{model}``), and sees only its models in ``/api/tags``, ``/api/ps`` and ``/v1/models``.
Its request bodies are read here as Ollama reads them (JSON keys match case-insensitively, the last
value wins, text after the first JSON value is ignored), and every value Ollama could take for a
model name must be allowed; a body that cannot be read that way is refused. An inference-only key
may use only the endpoints of :data:`INFERENCE` (so no pull, push, create, copy, delete, blobs).

The key file is re-read when it changes (checked every :data:`POLL_INTERVAL` seconds) or at once
on SIGHUP; a file that no longer reads keeps the keys in force and logs why.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import stat
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from proxy.api.body import READ_BODY, off_loop, request_body
from proxy.api.context import PROXY
from proxy.api.error_replies import error_response
from proxy.api.stopping import PROBES
from proxy.api.ui import PATHS as PAGE
from proxy.background import running
from proxy.errors import ConfigError
from proxy.keystore import ApiKey, KeySet, load_keys
from proxy.metrics import Metrics

__all__ = ["AUTH", "KEY_NAME", "LiveKeys", "install", "middleware"]

log = logging.getLogger("ollamux.auth")

KEY_NAME = web.RequestKey("api_key_name", str)
"""The name of the key a request came with (for the access log); absent when it needed none."""
ANONYMOUS = "anonymous"
"""The ``key`` label of requests that needed no key (or came while no keys are configured)."""
POLL_INTERVAL = 2.0
"""Seconds between two looks at the key file for changes."""

STATUS = frozenset({"/proxy/status", "/proxy/node", "/proxy/instances", "/metrics"})
INFERENCE = {
    "GET": frozenset({"/", "/api/version", "/api/tags", "/api/ps", "/v1/models"} | STATUS),
    "POST": frozenset({"/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show"}),
}
"""What an inference-only key may call, besides everything under ``/v1/``."""
MODEL_FIELDS = frozenset({"model", "name", "from", "source", "destination"})
"""Top-level body fields whose value Ollama takes as a model name (compared case-folded)."""
LISTS = {
    "/api/tags": ("models", "name"),
    "/api/ps": ("models", "name"),
    "/v1/models": ("data", "id"),
}
"""Model lists a model-limited key sees filtered: the list field and each entry's name field."""
ADMIN_PREFIX = "/proxy/instances/"


class LiveKeys:
    """The key file as last read well; :meth:`refresh` re-reads it when it changed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen = _signature(path)
        self.keys = load_keys(path)  # ConfigError at start: the proxy does not start
        _warn_if_writable(path)

    def refresh(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed (or ``force``); True when new keys are in force."""
        seen = _signature(self.path)
        if seen == self._seen and not force:
            return False
        self._seen = seen
        try:
            keys = load_keys(self.path)
        except ConfigError as exc:
            log.error(
                "API keys not reloaded, the %d key(s) read before stay in force: %s",
                len(self.keys.keys),
                exc,
            )
            return False
        _warn_if_writable(self.path)
        self.keys = keys
        log.info("API keys reloaded from %s: %d key(s)", self.path, len(keys.keys))
        return True


@dataclass(eq=False)
class Auth:
    """The middleware's state: the live keys (None: no key file) and the settings."""

    live: LiveKeys | None
    protect_status: bool
    admin_token: str
    """The config's ``admin_token`` ("" = none)."""
    metrics: Metrics

    def keys(self) -> KeySet:
        return self.live.keys if self.live is not None else KeySet()


AUTH = web.AppKey("auth", Auth)


def install(app: web.Application) -> None:
    """Read the key file (a ConfigError names it if it is wrong) and watch it while serving."""
    proxy = app[PROXY]
    config = proxy.config
    live = LiveKeys(config.auth.keys_file) if config.auth.keys_file else None
    app[AUTH] = Auth(
        live=live,
        protect_status=config.auth.protect_status,
        admin_token=config.admin_token,
        metrics=proxy.metrics,
    )
    if live is not None:
        log.info("API keys from %s: %d key(s)", live.path, len(live.keys.keys))
        app.cleanup_ctx.append(_watching)


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The key check of every request (see the module's docstring for what stays open)."""
    auth = request.app[AUTH]
    keys = auth.keys()
    if not keys or _open(request, auth):
        auth.metrics.key_requests.labels(ANONYMOUS).inc()
        return await handler(request)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and _admin_reads(request, auth, token.strip()):
        auth.metrics.key_requests.labels(ANONYMOUS).inc()
        return await handler(request)
    if scheme.lower() != "bearer" or not token.strip():
        return _refuse(
            request, auth, 401, "no_key",
            "unauthorized: this server needs an API key; send the header "
            "Authorization: Bearer <key>",
        )  # fmt: skip
    key = keys.match(token.strip())
    if key is None:
        return _refuse(
            request, auth, 401, "bad_key",
            "unauthorized: the API key is not valid (mistyped, or revoked)",
        )  # fmt: skip
    request[KEY_NAME] = key.name
    auth.metrics.key_requests.labels(key.name).inc()
    refusal = await _limits(request, auth, key)
    if refusal is not None:
        return refusal
    # The key is ollamux's: the instances never see it.
    response = await handler(request.clone(headers=_without_key(request)))
    if key.models and request.method == "GET" and request.path in LISTS:
        return _filtered(request.path, response, key)
    return response


def _without_key(request: web.Request) -> CIMultiDict[str]:
    headers = CIMultiDict(request.headers)
    headers.popall("Authorization", None)
    return headers


def _admin_reads(request: web.Request, auth: Auth, token: str) -> bool:
    """The admin token reads the status endpoints too (``ollamux instances`` sends it)."""
    admin = auth.admin_token
    return (
        bool(admin)
        and request.method in ("GET", "HEAD")
        and request.path in STATUS
        and hmac.compare_digest(token.encode(), admin.encode())
    )


def _open(request: web.Request, auth: Auth) -> bool:
    """Requests that need no key even while keys are configured."""
    method, path = request.method, request.path
    if method == "OPTIONS" or (
        (path == "/" or path in PAGE or path in PROBES) and method in ("GET", "HEAD")
    ):
        return True
    if path in STATUS and method in ("GET", "HEAD"):
        return not auth.protect_status
    return method == "POST" and path.startswith(ADMIN_PREFIX) and bool(auth.admin_token)


async def _limits(request: web.Request, auth: Auth, key: ApiKey) -> web.Response | None:
    """The 403 for what ``key`` may not do, else None."""
    method, path = request.method, request.path
    limited = key.inference_only or bool(key.models)
    if method == "POST" and path.startswith(ADMIN_PREFIX) and limited:
        return _refuse(
            request, auth, 403, "admin",
            f"forbidden: the API key {key.name!r} is limited; admin actions need a key "
            "without limits, or the admin_token",
        )  # fmt: skip
    if key.inference_only and not _inference(method, path):
        return _refuse(
            request, auth, 403, "inference_only",
            f"forbidden: the API key {key.name!r} is for inference only; it may not use "
            f"{method} {path} (model management: pull, push, create, copy, delete, blobs)",
        )  # fmt: skip
    if not key.models:
        return None
    named = await _named_models(request)
    if named is None:
        return _refuse(
            request, auth, 403, "model",
            f"forbidden: the API key {key.name!r} is limited to models, and this request's "
            "body is not JSON the proxy can read to tell which model it names",
        )  # fmt: skip
    for model in named:
        if not key.allows(model):
            return _refuse(
                request, auth, 403, "model",
                f"forbidden: the API key {key.name!r} may not use the model {model!r}",
            )  # fmt: skip
    return None


def _inference(method: str, path: str) -> bool:
    if path.startswith("/v1/"):
        return method in ("GET", "HEAD", "POST")
    allowed = INFERENCE.get("GET" if method == "HEAD" else method, frozenset())
    return path in allowed


async def _named_models(request: web.Request) -> list[str] | None:
    """Every model name the request gives Ollama; None when its body cannot be read as JSON."""
    path = request.path
    named = [path.removeprefix("/v1/models/")] if path.startswith("/v1/models/") else []
    if not request.body_exists or path.startswith("/api/blobs/"):
        return named
    body = await request_body(request)
    request[READ_BODY] = body  # the handler reads it from here
    found = await off_loop(len(body), body_models, body)
    return None if found is None else named + found


def body_models(body: bytes) -> list[str] | None:
    """The values of a JSON body's model-naming fields, read as Ollama's Go decoder reads them.

    Keys match case-insensitively and every duplicate counts (Go keeps the last non-null one);
    invalid UTF-8 becomes U+FFFD; text after the first JSON value is ignored, as Ollama ignores
    it. None when the body does not start with a JSON value Python can parse (then the proxy
    cannot tell what Ollama would read). A value that is not a string fails Ollama's decoding.
    """
    text = body.decode("utf-8", "replace").lstrip(" \t\r\n")
    if not text:
        return []
    try:
        value, _ = json.JSONDecoder(object_pairs_hook=_pairs).raw_decode(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, _Pairs):
        return []  # not an object: Ollama refuses it with 400
    return [v for k, v in value if k.casefold() in MODEL_FIELDS and isinstance(v, str) and v]


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its key/value pairs in order, duplicates kept."""


def _pairs(pairs: list[tuple[str, Any]]) -> _Pairs:
    return _Pairs(pairs)


def _filtered(path: str, response: web.StreamResponse, key: ApiKey) -> web.StreamResponse:
    """A model list with only ``key``'s models (an unreadable one becomes an empty list)."""
    if not isinstance(response, web.Response) or response.status != 200:
        return response
    field, name = LISTS[path]
    try:
        data = json.loads(response.body) if isinstance(response.body, bytes) else None
        entries = data[field] if isinstance(data, dict) else None
    except (ValueError, KeyError):
        data, entries = None, None
    if not isinstance(data, dict) or not isinstance(entries, list):
        data, entries = {field: []}, []
    kept = [e for e in entries if isinstance(e, dict) and key.allows(str(e.get(name, "")))]
    return web.Response(
        text=json.dumps({**data, field: kept}, separators=(",", ":")),
        content_type="application/json",
        charset="utf-8",
    )


def _refuse(
    request: web.Request, auth: Auth, status: int, reason: str, message: str
) -> web.Response:
    """The 401 or 403; counted by reason and logged without the key or anything of it."""
    auth.metrics.auth_refused.labels(reason).inc()
    who = f" (key {request[KEY_NAME]})" if KEY_NAME in request else ""
    path = request.path[:200]
    log.warning("refused %s %r with %d: %s%s", request.method, path, status, reason, who)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    response = error_response(request.path, status, message, headers)
    if request.body_exists and READ_BODY not in request:
        response.force_close()  # the body is still on its way: do not read it
    return response


# --- reloading -----------------------------------------------------------------------------------


async def _watching(app: web.Application) -> AsyncIterator[None]:
    """While serving: re-read the key file on change (polled) and at once on SIGHUP."""
    auth = app[AUTH]
    assert auth.live is not None
    live = auth.live
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()
    on_hup = _catch_sighup(loop, wake)

    async def watch() -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), POLL_INTERVAL)
            forced = wake.is_set()
            wake.clear()
            before = set(live.keys.names())
            if forced:
                log.info("SIGHUP: reading the API keys again")
            if live.refresh(force=forced):
                for gone in before - set(live.keys.names()):
                    with contextlib.suppress(KeyError):
                        auth.metrics.key_requests.remove(gone)

    try:
        async with running(watch()):
            yield
    finally:
        if on_hup:
            loop.remove_signal_handler(signal.SIGHUP)


def _catch_sighup(loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> bool:
    """Set ``wake`` on SIGHUP where signals can be caught (Unix, main thread)."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return False
    try:
        loop.add_signal_handler(signal.SIGHUP, wake.set)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True


def _signature(path: str) -> tuple[int, int, int, int] | None:
    """What changes when the file is written or replaced; None while it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _warn_if_writable(path: str) -> None:
    with contextlib.suppress(OSError):
        mode = os.stat(path).st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning(
                "%s can be written by other users (mode %o): they could add keys; chmod 600 it",
                path,
                stat.S_IMODE(mode),
            )
