"""Instance admin over HTTP: list, drain, undrain and restart instances (``/proxy/instances``).

======================================  =========================================================
``GET /proxy/instances``                every instance: state, launcher, GPUs, requests in flight,
                                        and what its launcher says of it (pid, crashes)
``POST /proxy/instances/{name}/drain``  no new requests go there; those in flight finish
``POST .../{name}/undrain``             it takes requests again
``POST .../{name}/restart``             through its launcher (the supervisor, or systemctl);
                                        answers once the instance answers again
======================================  =========================================================

The POSTs need ``Authorization: Bearer <admin_token>`` when ``admin_token`` is set. Without a token
they are allowed only while the proxy listens on a loopback address, where only this host reaches
them, and refused with 403 otherwise. Drained instances stay drained until undrained.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from typing import Any, Protocol

from aiohttp import web

from proxy.api.context import PROXY, Proxy
from proxy.api.error_replies import error_response
from proxy.api.ollama import json_response
from proxy.balancer.state import InstanceState
from proxy.config import parse_listen
from proxy.errors import LaunchError

__all__ = ["LAUNCHER", "InstanceLauncher", "install", "is_loopback"]

log = logging.getLogger("ollamux.admin")


class InstanceLauncher(Protocol):
    """What the admin API asks of whatever started the instances (``ollamux serve``)."""

    def describe(self, name: str) -> str:
        """The instance's process in a few words (``running (pid 42)``); empty if not managed."""

    async def restart(self, name: str) -> None:
        """Restart instance ``name``, returning once it answers; LaunchError if it cannot."""


class _Unmanaged:
    """The launcher of a proxy built without one: it knows nothing and restarts nothing."""

    def describe(self, name: str) -> str:
        return ""

    async def restart(self, name: str) -> None:
        raise LaunchError(
            f"instance {name} was not started by this proxy (no launcher); restart it where it runs"
        )


LAUNCHER: web.AppKey[InstanceLauncher] = web.AppKey("launcher")


def install(app: web.Application, launcher: InstanceLauncher | None) -> None:
    """Add the routes to ``app``, with ``launcher`` for restarts (None: restarts are refused)."""
    app[LAUNCHER] = launcher if launcher is not None else _Unmanaged()
    config = app[PROXY].config
    if not config.admin_token and not is_loopback(parse_listen(config.listen)[0]):
        log.warning(
            "listening on %s beyond loopback without admin_token: admin actions "
            "(POST /proxy/instances/...) are refused; set admin_token to allow them",
            config.listen,
        )
    app.add_routes(
        [
            web.get("/proxy/instances", list_instances),
            web.post("/proxy/instances/{name}/drain", drain),
            web.post("/proxy/instances/{name}/undrain", undrain),
            web.post("/proxy/instances/{name}/restart", restart),
        ]
    )


def is_loopback(host: str) -> bool:
    """``127.0.0.1``, ``::1``, ``localhost``: addresses only this host can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def list_instances(request: web.Request) -> web.Response:
    proxy = request.app[PROXY]
    launcher = request.app[LAUNCHER]
    return json_response({"instances": [_entry(proxy, i, launcher) for i in proxy.instances]})


async def drain(request: web.Request) -> web.StreamResponse:
    found = _admit(request)
    if isinstance(found, web.StreamResponse):
        return found
    if request.app[PROXY].router.set_draining(found, True):
        log.info(
            "instance %s is draining: no new requests; %d in flight finish",
            found.name, found.inflight_total(),
        )  # fmt: skip
    return json_response(_entry(request.app[PROXY], found, request.app[LAUNCHER]))


async def undrain(request: web.Request) -> web.StreamResponse:
    found = _admit(request)
    if isinstance(found, web.StreamResponse):
        return found
    proxy = request.app[PROXY]
    if proxy.router.set_draining(found, False):
        log.info("instance %s takes requests again", found.name)
    return json_response(_entry(proxy, found, request.app[LAUNCHER]))


async def restart(request: web.Request) -> web.StreamResponse:
    found = _admit(request)
    if isinstance(found, web.StreamResponse):
        return found
    proxy = request.app[PROXY]
    kind = _launchers(proxy).get(found.name, "")
    if kind in ("external", "node"):
        return error_response(
            request.path,
            409,
            f"instance {found.name} is {kind}: ollamux does not run it; restart it where it runs",
        )
    log.info("instance %s: restart requested (%d in flight)", found.name, found.inflight_total())
    try:
        await request.app[LAUNCHER].restart(found.name)
    except LaunchError as exc:
        log.error("instance %s: restart failed: %s", found.name, exc)
        # A launcher's reasons may name addresses, paths and process output: the log has them.
        message = f"instance {found.name} failed to restart; the proxy's log says why"
        if isinstance(request.app[LAUNCHER], _Unmanaged):
            message = str(exc)  # our own sentence: nothing was started here
        return error_response(request.path, 502, message)
    if proxy.monitor is not None:
        await proxy.monitor.check_all()  # so the answer (and routing) sees it up at once
    return json_response(_entry(proxy, found, request.app[LAUNCHER]))


# --- helpers -------------------------------------------------------------------------------------


def _admit(request: web.Request) -> InstanceState | web.StreamResponse:
    """The instance named in the path, or the error response (401, 403, 404) to answer instead."""
    proxy = request.app[PROXY]
    config = proxy.config
    if config.admin_token:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        expected = config.admin_token.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            return error_response(
                request.path,
                401,
                "admin actions need the header Authorization: Bearer <admin_token>",
                {"WWW-Authenticate": 'Bearer realm="ollamux admin"'},
            )
    elif not is_loopback(parse_listen(config.listen)[0]):
        return error_response(
            request.path,
            403,
            f"admin actions are refused: the proxy listens on {config.listen}, beyond loopback, "
            "and no admin_token is set; set admin_token in the config",
        )
    name = request.match_info["name"]
    for inst in proxy.instances:
        if inst.name == name:
            return inst
    known = ", ".join(i.name for i in proxy.instances)
    return error_response(request.path, 404, f"no instance {name!r}; the instances are {known}")


def _launchers(proxy: Proxy) -> dict[str, str]:
    instances = proxy.config.instances
    return {} if instances == "auto" else {i.name: i.launcher for i in instances}


def _entry(proxy: Proxy, inst: InstanceState, launcher: InstanceLauncher) -> dict[str, Any]:
    return {
        "name": inst.name,
        "url": inst.url,
        "launcher": _launchers(proxy).get(inst.name, ""),
        "state": inst.state,
        "healthy": inst.healthy,
        "draining": inst.draining,
        "inflight": inst.inflight_total(),
        "slots": inst.slots,
        "gpus": list(inst.gpu_uuids),
        "process": launcher.describe(inst.name),
    }
