"""The CLI side of a running proxy's HTTP API: one request, JSON back, failure in one sentence."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from proxy.errors import ConfigError, OllamuxError

DEFAULT_URL = "http://127.0.0.1:11434"


def normalize_url(url: str) -> str:
    """``127.0.0.1:11434/`` -> ``http://127.0.0.1:11434``."""
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


def call(
    base: str,
    method: str,
    path: str,
    *,
    token: str = "",
    timeout: float = 10.0,
    argument: str = "",
) -> Any:
    """``method`` ``base+path`` and its JSON answer; OllamuxError (exit 1) when that fails.

    With ``argument`` (e.g. ``NAME``), a 404 means that argument names nothing: a ConfigError
    (exit 2, a bad argument) with the proxy's message.
    """
    data = b"" if method == "POST" else None
    request = urllib.request.Request(base + path, method=method, data=data)
    token = token or os.environ.get("OLLAMUX_API_KEY", "")  # a proxy with auth.protect_status
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        said = _error_text(exc)
        if exc.code == 404 and argument:
            raise ConfigError(said, path=argument) from None
        raise OllamuxError(f"{method} {base}{path} answered {exc.code}: {said}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OllamuxError(
            f"cannot reach the proxy at {base} ({reason}); is `ollamux serve` running?"
        ) from None
    except ValueError:
        raise OllamuxError(f"{base}{path} did not answer JSON; is it an ollamux proxy?") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    body = exc.read().decode(errors="replace")
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.strip()[:200] or str(exc.reason)
