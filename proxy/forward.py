"""One upstream exchange under deadlines: headers, Host rewrite, chunks as they come, abort.

This is the single seam where aiohttp client errors become ``UpstreamError``s, with texts that name
the instance but never its address or aiohttp's internals. Bodies go upstream as received and come
back chunk by chunk as they arrive (never buffered); a chunked answer is relayed by
``proxy/splice.py``, its bytes written to the client from the upstream connection's protocol.

Deadlines ride on aiohttp's socket read timeout, which restarts on every byte received, so they
cost no Python work per chunk: until the first byte the exchange allows ``first`` seconds (the
load, when the model is cold there, plus the first token), then ``idle`` seconds between chunks.
``abort`` ends the exchange from outside (the instance went down or was ejected).
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy import splice
from proxy.balancer.state import InstanceState
from proxy.errors import UpstreamConnectError, UpstreamError, UpstreamStatus, UpstreamTimeout

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
# requires), Content-Length (recomputed), Origin (the proxy's edge judges it; Ollama would 403 an
# origin it does not know) and Accept-Encoding (so bodies pass through byte for byte).
_NOT_UPSTREAM = HOP_BY_HOP | {"host", "content-length", "origin", "accept-encoding"}
_NOT_DOWNSTREAM = HOP_BY_HOP | {"content-length", "content-encoding", "date", "server"}
_TAIL_LIMIT = 1 << 20
_STREAMED_BODY = 1 << 20
BROKEN = "an error was encountered while running the model: the instance stopped answering"
"""What a client reads when a stream breaks: Ollama's wording, no proxy internals."""


def upstream_headers(
    headers: Mapping[str, str], replace: Mapping[str, str] | None = None
) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones and those the proxy must not pass on, with
    ``replace`` set over them (an instance's own ``Authorization``)."""
    drop = _NOT_UPSTREAM | {
        token.strip().lower() for token in headers.get("Connection", "").split(",") if token
    }
    out = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)
    for key, value in (replace or {}).items():
        out[key] = value
    return out


class StreamWatcher:
    """Looks at relayed bytes without holding them up: first byte, final metrics, error lines."""

    def __init__(self, on_final: Callable[[], None] | None = None) -> None:
        self.first_byte: float | None = None
        self.final: dict[str, Any] | None = None
        self._on_final = on_final
        """Called once, when the final metrics line comes (the generation is over)."""
        self.error: str | None = None
        """The message of an in-band ``{"error": ...}`` line (or SSE error event), if one came."""
        self.tokens = False
        """A line that is not an error came: the model started answering."""
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
        if line.startswith(b"data: "):
            line = line[6:]
        if not line.strip():
            return
        if line.startswith(b'{"error"'):
            self.error = _error_message(line)
            return
        self.tokens = True
        if (
            b'"done":true' not in line
            and b'"usage"' not in line
            and b'"prompt_eval_count"' not in line
        ):
            return  # not a final line (embeddings have no "done": their counts are the mark)
        try:
            data = json.loads(line)
        except ValueError:
            return
        if isinstance(data, dict):
            self.final = data
            if self._on_final is not None:
                self._on_final()
                self._on_final = None


def _error_message(line: bytes) -> str:
    try:
        error = json.loads(line).get("error")
    except (ValueError, AttributeError):
        return "error"
    if isinstance(error, dict):
        error = error.get("message")
    return str(error or "error")


class Exchange:
    """One request to one instance: open it, read its chunks, or abort it from outside."""

    def __init__(
        self, session: aiohttp.ClientSession, inst: InstanceState, *, connect: float
    ) -> None:
        self.instance = inst
        self._session = session
        self._connect = connect
        self._aborted: asyncio.Future[str] | None = None
        self._response: aiohttp.ClientResponse | None = None
        self.abort_reason = ""
        self.delivering = False
        """The answer is being relayed to the client (see :func:`copy`)."""

    async def open(
        self,
        method: str,
        path_qs: str,
        headers: Mapping[str, str],
        body: Any,
        *,
        first: float | None,
        idle: float | None,
    ) -> aiohttp.ClientResponse:
        """Send the request; return the response once its headers arrived (status < 500).

        ``first`` bounds the wait for the first byte, ``idle`` every wait after it (None: no
        bound). Raises UpstreamConnectError, UpstreamTimeout, or UpstreamStatus for a 5xx (its
        body read, so it can be relayed as is if no other instance does better).
        """
        name = self.instance.name
        if self.abort_reason:
            raise UpstreamConnectError(name, self.abort_reason)
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self._connect, sock_connect=self._connect, sock_read=first
        )
        request = asyncio.ensure_future(
            self._session.request(
                method,
                self.instance.url + path_qs,
                headers=upstream_headers(headers, self.instance.auth()),
                data=_payload(body),
                timeout=timeout,
                allow_redirects=False,
                auto_decompress=False,
            )
        )
        self._aborted = asyncio.get_running_loop().create_future()
        waits: set[asyncio.Future[Any]] = {request, self._aborted}
        kept = False
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            kept = not self.abort_reason
        finally:
            if not request.done():
                request.cancel()
                await asyncio.gather(request, return_exceptions=True)
            elif not kept and not request.cancelled() and request.exception() is None:
                request.result().close()  # aborted or cancelled just as the headers came
        if self.abort_reason:
            raise UpstreamConnectError(name, self.abort_reason)
        try:
            resp = request.result()
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(name, f"sent nothing within {first:g}s") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamConnectError(name, "could not be reached") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamConnectError(name, "closed the connection") from exc
        self._response = resp
        if resp.status >= 500:
            try:
                body_bytes = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                body_bytes = b""
            finally:
                resp.release()
            headers_out = {"Content-Type": resp.headers.get("Content-Type", "application/json")}
            raise UpstreamStatus(name, resp.status, body_bytes, headers_out)
        protocol = resp.connection.protocol if resp.connection is not None else None
        if protocol is not None:
            protocol.read_timeout = idle  # from the next byte on: the wait between chunks
        return resp

    async def chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The body as it arrives; UpstreamTimeout or UpstreamConnectError if it breaks."""
        name = self.instance.name
        try:
            async for chunk in resp.content.iter_any():
                yield chunk
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(name, "stopped sending") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamConnectError(name, self.abort_reason or "broke off its answer") from exc

    async def spliced(self, fast: splice.Splice, request: web.Request) -> None:
        """Wait for a splice (see ``proxy/splice.py``) to end; raise as :meth:`chunks` would.

        A client that left raises ConnectionResetError. A chunk cut off by a break is completed
        first, so the error line the caller writes next reaches the client as a line of its own.
        """
        result = await fast.run()
        if result == splice.DONE:
            return
        if result == splice.GONE:
            raise ConnectionResetError("the client left")
        client = request.transport
        if client is not None and not client.is_closing():
            client.write(fast.pad())
        name = self.instance.name
        if result == splice.TIMEOUT:
            raise UpstreamTimeout(name, "stopped sending")
        raise UpstreamConnectError(name, self.abort_reason or "broke off its answer")

    def abort(self, reason: str) -> None:
        """End the exchange now, wherever it is: the waiting side gets an UpstreamError."""
        if self.abort_reason:
            return
        self.abort_reason = reason
        if self._aborted is not None and not self._aborted.done():
            self._aborted.set_result(reason)
        if self._response is not None:
            self._response.close()

    def close(self) -> None:
        """Done with it: a fully read answer frees its connection for reuse; anything else drops
        the connection (when the client left, that stops the model)."""
        resp = self._response
        if resp is None:
            return
        if resp.content.at_eof() and not self.abort_reason:
            resp.release()
        else:
            resp.close()


async def copy(
    request: web.Request,
    exchange: Exchange,
    resp: aiohttp.ClientResponse,
    watcher: StreamWatcher,
    on_token: Callable[[], None],
) -> tuple[web.StreamResponse, UpstreamError | None]:
    """Copy the answer to the client chunk by chunk; returns it and the break, if it broke.

    A break is already written to the client as Ollama's error line. A client that left is noted
    in ``watcher.client_gone`` and stops the copy (closing the upstream stops the model).
    """
    out = web.StreamResponse(status=resp.status, reason=resp.reason)
    for key, value in resp.headers.items():
        if key.lower() not in _NOT_DOWNSTREAM:
            out.headers.add(key, value)
    length = resp.headers.get("Content-Length")
    if length is not None and "Transfer-Encoding" not in resp.headers:
        out.content_length = int(length)
    broken: UpstreamError | None = None
    try:
        await out.prepare(request)
        exchange.delivering = True
        try:
            fast = await splice.relay(request, out, resp, watcher, on_token)
            if fast is not None:
                await exchange.spliced(fast, request)
            else:
                async for chunk in exchange.chunks(resp):
                    watcher.feed(chunk)
                    if watcher.tokens:
                        on_token()
                    await out.write(chunk)
        except UpstreamError as exc:
            broken = exc
            await out.write(error_line(resp.headers.get("Content-Type", ""), BROKEN))
        watcher.close()
        if watcher.tokens:
            on_token()
        await out.write_eof()
    except ConnectionError:
        watcher.client_gone = True
    return out, broken


def _payload(body: Any) -> Any:
    """What aiohttp sends: large bodies as a stream, written in pieces, not one blocking write."""
    if isinstance(body, bytes) and len(body) > _STREAMED_BODY:
        return io.BytesIO(body)
    return body or None


def error_line(content_type: str, message: str) -> bytes:
    """The line that ends a broken stream: Ollama's NDJSON error, or an SSE error event."""
    if content_type.startswith("text/event-stream"):
        payload = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"
    return json.dumps({"error": message}, separators=(",", ":")).encode() + b"\n"
