"""`OLLAMA_HOST` read as Ollama reads it: the emulator's listen address, the CLI's proxy URL."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["DEFAULT_URL", "parse_ollama_host", "url_from_env"]

DEFAULT_URL = "http://127.0.0.1:11434"

_UNSPECIFIED = ("", "0.0.0.0", "::")


def parse_ollama_host(value: str) -> tuple[str, str, int]:
    """``OLLAMA_HOST`` read as Ollama reads it: ``(scheme, host, port)``.

    ``host``, ``host:port``, ``:port``, ``[v6]:port``, ``http://host[:port]``, ``https://host``:
    without a scheme it is http on 11434; ``http://`` without a port means 80, ``https://`` 443;
    a path is ignored; an empty host means every interface (for a listener) or this machine.
    """
    text = value.strip().strip("\"'").strip()
    scheme, sep, rest = text.partition("://")
    default_port = 11434
    if not sep:
        scheme, rest = "http", text
    elif scheme == "http":
        default_port = 80
    elif scheme == "https":
        default_port = 443
    hostport = rest.split("/", 1)[0]
    host, port = hostport, ""
    if hostport.startswith("["):
        inside, _, after = hostport[1:].partition("]")
        host, port = inside, after.removeprefix(":")
    elif hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
    elif hostport.count(":") > 1:  # a bare IPv6 address
        host = hostport
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        port = str(default_port)
    return scheme, host, int(port)


def url_from_env(environ: Mapping[str, str]) -> str:
    """The proxy a CLI command talks to: ``$OLLAMUX_URL``, else ``$OLLAMA_HOST``, else local."""
    if environ.get("OLLAMUX_URL", "").strip():
        return _normalize(environ["OLLAMUX_URL"])
    if not environ.get("OLLAMA_HOST", "").strip():
        return DEFAULT_URL
    scheme, host, port = parse_ollama_host(environ["OLLAMA_HOST"])
    host = "127.0.0.1" if host in _UNSPECIFIED else host  # a listener's "all interfaces"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _normalize(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url
