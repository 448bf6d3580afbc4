"""One upstream exchange: headers, Host rewrite, streaming copy, cancel on disconnect.

This is the single seam where aiohttp client errors become ``UpstreamError``s. Bodies go upstream
as received and come back chunk by chunk as they arrive (never buffered), so a token reaches the
client in the same event-loop turn it reached the proxy.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.balancer.state import InstanceState
from proxy.errors import UpstreamConnectError, UpstreamStatus, UpstreamTimeout

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Connection",
    )
)
# Also never forwarded upstream: Host (aiohttp writes the backend's own, which a loopback Ollama
# requires), Content-Length (recomputed), Origin (the proxy answers CORS itself; Ollama would 403
# an origin it does not know) and Accept-Encoding (so bodies pass through byte for byte).
_NOT_UPSTREAM = HOP_BY_HOP | {"host", "content-length", "origin", "accept-encoding"}
_NOT_DOWNSTREAM = HOP_BY_HOP | {"content-length", "content-encoding", "date", "server"}
_TAIL_LIMIT = 1 << 20


def upstream_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones and those the proxy must not pass on."""
    drop = _NOT_UPSTREAM | {
        token.strip().lower() for token in headers.get("Connection", "").split(",") if token
    }
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


class StreamWatcher:
    """Looks at relayed bytes without holding them up: first byte time and the final metrics."""

    def __init__(self) -> None:
        self.first_byte: float | None = None
        self.final: dict[str, Any] | None = None
        self.client_gone = False
        """The client closed its connection before the answer was all written."""
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        if self.first_byte is None and chunk:
            self.first_byte = time.monotonic()
        data = self._tail + chunk
        lines = data.split(b"\n")
        self._tail = lines.pop()[-_TAIL_LIMIT:]
        for line in lines:
            self._look(line)

    def close(self) -> None:
        if self._tail:
            self._look(self._tail)
            self._tail = b""

    def _look(self, line: bytes) -> None:
        if (
            b'"done":true' not in line
            and b'"usage"' not in line
            and b'"prompt_eval_count"' not in line
        ):
            return  # not a final line (embeddings have no "done": their counts are the mark)
        if line.startswith(b"data: "):
            line = line[6:]
        try:
            data = json.loads(line)
        except ValueError:
            return
        if isinstance(data, dict):
            self.final = data


class Forwarder:
    """Opens requests to instances over one pooled client session."""

    def __init__(
        self, session: aiohttp.ClientSession, *, connect_timeout: float, first_byte_timeout: float
    ) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_connect=connect_timeout
        )
        self._first_byte = first_byte_timeout

    async def open(
        self,
        inst: InstanceState,
        method: str,
        path_qs: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> aiohttp.ClientResponse:
        """Send the request; return the response once its headers arrived (status < 500).

        Raises UpstreamConnectError, UpstreamTimeout, or UpstreamStatus for a 5xx (its body read,
        so it can be relayed as is if no other instance does better).
        """
        try:
            # Ollama sends its headers with the first chunk, so this bounds the wait for it
            resp = await asyncio.wait_for(
                self._session.request(
                    method,
                    inst.url + path_qs,
                    headers=upstream_headers(headers),
                    data=body or None,
                    timeout=self._timeout,
                    allow_redirects=False,
                    auto_decompress=False,
                ),
                self._first_byte,
            )
        except asyncio.TimeoutError as exc:
            raise UpstreamTimeout(inst.name, "no answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamConnectError(inst.name, str(exc) or type(exc).__name__) from exc
        if resp.status >= 500:
            try:
                body_bytes = await resp.read()
            except aiohttp.ClientError:
                body_bytes = b""
            finally:
                resp.release()
            headers_out = {"Content-Type": resp.headers.get("Content-Type", "application/json")}
            raise UpstreamStatus(inst.name, resp.status, body_bytes, headers_out)
        return resp

    async def relay(
        self, resp: aiohttp.ClientResponse, request: web.Request, watcher: StreamWatcher
    ) -> tuple[web.StreamResponse, str | None]:
        """Copy the response to the client chunk by chunk.

        Returns the client response and, if the upstream broke mid-body, the error text (already
        written to the client as Ollama's mid-stream error line).
        """
        out = web.StreamResponse(status=resp.status, reason=resp.reason)
        for key, value in resp.headers.items():
            if key.lower() not in _NOT_DOWNSTREAM:
                out.headers.add(key, value)
        if (
            resp.headers.get("Content-Length") is not None
            and "Transfer-Encoding" not in resp.headers
        ):
            out.content_length = int(resp.headers["Content-Length"])
        try:
            await out.prepare(request)
        except ConnectionError:
            watcher.client_gone = True
            return out, None
        try:
            async for chunk in resp.content.iter_any():
                watcher.feed(chunk)
                await _to_client(out, chunk, watcher)
                if watcher.client_gone:  # stop reading: closing the upstream stops the model
                    return out, None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            message = (
                f"an error was encountered while running the model: {exc or 'connection lost'}"
            )
            await _to_client(
                out, error_line(resp.headers.get("Content-Type", ""), message), watcher
            )
            return out, message
        finally:
            watcher.close()
        try:
            await out.write_eof()
        except ConnectionError:
            watcher.client_gone = True
        return out, None


async def _to_client(out: web.StreamResponse, data: bytes, watcher: StreamWatcher) -> None:
    """Write to the client; a closed client connection is noted, not mistaken for the upstream's."""
    try:
        await out.write(data)
    except ConnectionError:
        watcher.client_gone = True


def error_line(content_type: str, message: str) -> bytes:
    """The line that ends a broken stream: Ollama's NDJSON error, or an SSE error event."""
    if content_type.startswith("text/event-stream"):
        payload = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"
    return json.dumps({"error": message}, separators=(",", ":")).encode() + b"\n"
