"""Client connections: how long an idle or trickling one may stay, and how many may be open.

aiohttp's server closes a connection that is waiting for a request when its ``keepalive_timeout``
has passed since the connection was opened or since its last answer ended, and a request counts
only once its head (request line and headers) is complete. That one setting, ``limits.client_idle``,
therefore bounds both idle keep-alive connections and clients that trickle their headers
(slowloris); a request being answered, a long stream included, is never affected. A body that
stalls is bounded by :func:`proxy.api.body.read_body`.

Each open connection is a file descriptor. The soft limit is often 1024 (systemd's default), so a
few hundred idle clients could leave none for the connections to the instances; the proxy raises
its soft limit to the hard one at start, as Go programs such as Ollama do.
"""

from __future__ import annotations

import logging
from typing import Any

from proxy.config import LimitsConfig

log = logging.getLogger("ollamux.proxy")


def runner_options(limits: LimitsConfig) -> dict[str, Any]:
    """Keyword arguments for ``web.AppRunner`` (and ``TestServer.start_server``)."""
    return {"keepalive_timeout": limits.client_idle}


def raise_open_files_limit() -> int:
    """Raise the soft limit of open files to the hard limit; returns the soft limit now in force."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY:
        return soft  # an unlimited hard limit cannot be set as the soft one on every system
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, exc)
            return soft
        return hard
    return soft
