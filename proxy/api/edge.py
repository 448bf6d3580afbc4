"""The proxy's edge: Ollama's Host and Origin checks and CORS, before anything else sees a request.

The rules and the middleware are :mod:`proxy.frontdoor`, the same code the emulator runs, so a
request the edge refuses gets exactly Ollama's answer (403, empty body) and a preflight exactly its
204. The allowed origins are Ollama's defaults, ``cors.origins`` from the config and the
``OLLAMA_ORIGINS`` environment variable of the proxy process; the Host check applies when
``listen`` is a loopback address, as Ollama's does.

The edge is the outermost middleware (:func:`install` puts it first; ``serve_proxy`` puts the
stopping gate just inside it), so a refused request reaches no gate, limit, router or instance,
and every answer to an allowed cross-origin request, streams and errors included, carries
``Access-Control-Allow-Origin``. Since the edge judges ``Origin``, the forwarding seam never
passes it upstream.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from aiohttp import web

from proxy.config import Config, parse_listen
from proxy.frontdoor import DEFAULT_ORIGINS, Origins, cors_headers, env_origins, front_door

__all__ = ["allowed_origins", "install"]

log = logging.getLogger("ollamux.proxy")


def allowed_origins(config: Config, environ: Mapping[str, str] | None = None) -> Origins:
    """Ollama's default origins, then ``cors.origins``, then ``OLLAMA_ORIGINS``.

    An ``OLLAMA_ORIGINS`` entry Ollama itself would refuse to start with is a ConfigError naming
    the variable and the fix.
    """
    from_env = env_origins(os.environ if environ is None else environ)
    if from_env:
        log.info("OLLAMA_ORIGINS adds allowed origins: %s", ", ".join(from_env))
    return Origins((*DEFAULT_ORIGINS, *config.cors.origins, *from_env))


def install(app: web.Application, config: Config) -> None:
    """Put the edge in front of ``app``'s middlewares and add its CORS response headers."""
    allowed = allowed_origins(config)
    host, _ = parse_listen(config.listen)
    app.middlewares.insert(0, front_door(allowed, host))
    app.on_response_prepare.append(cors_headers(allowed))
