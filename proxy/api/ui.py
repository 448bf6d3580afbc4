"""The live page at /proxy/ui: one HTML page, its script and its style, from the package's data.

The files are ``proxy/ui/*`` in the installed package (read with :mod:`importlib.resources`, so a
wheel serves them too); nothing is built and nothing comes from another site. The page polls
``GET /proxy/status`` from the browser and draws it: GPUs, loaded models, slots, queues, time to
first token and the last requests with the reason each was routed.

The files hold no data of the box, so ``auth.py`` lets anyone fetch them (:data:`PATHS`); what
the page shows comes from ``/proxy/status``, which keeps its own rule (``auth.protect_status``):
when that needs a key the page asks for one and sends it as ``Authorization: Bearer``.
Every answer here carries a Content-Security-Policy that allows only this origin, so the page runs
no inline script and loads nothing from elsewhere.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = ["ASSETS", "CSP", "PATHS", "PREFIX", "routes"]

PREFIX = "/proxy/ui"
ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
    "icon.svg": "image/svg+xml",
}
"""The files of ``proxy/ui/`` that are served, with their content types (all UTF-8)."""
PATHS = frozenset({PREFIX, PREFIX + "/", *(f"{PREFIX}/{name}" for name in ASSETS)})
"""Every path this module answers (``auth.py`` leaves them open: they hold no data)."""
CSP = "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
"""Only this origin, for scripts, styles and fetches; no framing by other sites."""


def routes() -> list[web.RouteDef]:
    """The page at ``/proxy/ui`` (and ``/proxy/ui/``) and each asset at ``/proxy/ui/NAME``.

    Any other path under ``/proxy/ui/`` is no route of these: it goes on as every unknown path
    does (to an instance, whose 404 the client gets).
    """
    return [
        web.get(PREFIX, _serve("index.html")),
        web.get(PREFIX + "/", _serve("index.html")),
        *(web.get(f"{PREFIX}/{name}", _serve(name)) for name in ASSETS),
    ]


def _serve(name: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return _file(name)

    return handler


def _file(name: str) -> web.Response:
    body = resources.files("proxy").joinpath("ui").joinpath(name).read_bytes()
    return web.Response(
        body=body,
        content_type=ASSETS[name],
        charset="utf-8",
        headers={
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
            "Referrer-Policy": "no-referrer",
        },
    )
