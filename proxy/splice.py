"""The body relay's fast path: an upstream's chunked answer goes to the client's socket as it is.

Relayed through aiohttp, every token costs a parse into a buffer, a wake-up of the reading task
and a re-framed write. Here the upstream connection's protocol (:class:`SpliceHandler`, installed
on every pooled connection by :func:`connector`) writes each chunk's bytes, framing included,
straight to the client's transport from ``data_received``, once :func:`relay` has taken the answer
over after its headers. Python still looks at every chunk: where it ends, what the
``StreamWatcher`` reads in it (first token, final metrics, error lines). When the last chunk comes,
the rest goes back to aiohttp's parser, which ends the answer as if it had read it all, so the
connection is reused.

To take over at a known place, the handler feeds aiohttp's parser whole chunks only: a chunk that
the network cut in two is held until its end comes (up to 1 MiB; past that the answer is left to
aiohttp). Between two events the parser therefore stands between chunks. Flow control: when the
client's transport buffers more than its high-water mark, reading upstream pauses until it drains.
The idle deadline between chunks is one timer that re-arms itself from the time of the last
bytes, not one per chunk. :func:`relay` answers None when it cannot take over (the caller relays
the answer through aiohttp as before): the body is not chunked, the answer already ended, the
client's side is not chunked (HTTP/1.0) or compressed, or the request is a HEAD.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.client_proto import ResponseHandler

if TYPE_CHECKING:
    from proxy.forward import StreamWatcher

DONE, GONE, LOST, TIMEOUT, BAD = "done", "gone", "lost", "timeout", "bad"
"""How a splice ends: the last chunk came; the client left; the upstream connection closed; the
upstream was silent past the idle deadline; the upstream's framing was not chunked encoding."""

_HEAD, _BODY, _OFF = 0, 1, 2
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked[ \t]*\r\n")
_HOLD_LIMIT = 1 << 20
_SIZE_LINE_LIMIT = 4096


def connector(**kwargs: Any) -> aiohttp.TCPConnector:
    """A TCP connector whose connections can be spliced (same arguments as aiohttp's)."""
    conn = aiohttp.TCPConnector(**kwargs)
    # aiohttp makes each connection's protocol with this factory; it has no public hook for it
    factory = functools.partial(SpliceHandler, loop=asyncio.get_running_loop())
    conn._factory = factory  # type: ignore[assignment]
    return conn


class SpliceHandler(ResponseHandler):
    """aiohttp's response protocol, which feeds its parser whole chunks and can be spliced."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._state = _OFF
        self._held = b""
        self.splice: Splice | None = None
        super().__init__(loop)

    def set_response_params(self, **kwargs: Any) -> None:
        """Called for each request before it is sent: a new answer starts."""
        self._state, self._held, self.splice = _HEAD, b"", None
        super().set_response_params(**kwargs)

    @property
    def spliceable(self) -> bool:
        """The parser stands between two chunks of a chunked answer that has not ended."""
        return self._state == _BODY and self.splice is None and self.is_connected()

    def data_received(self, data: bytes) -> None:
        splice = self.splice
        if splice is not None:
            splice.relay(data)
        elif self._state == _OFF:
            super().data_received(data)
        elif self._state == _BODY:
            self._body(self._held + data if self._held else data)
        else:
            self._head(self._held + data if self._held else data)

    def connection_lost(self, exc: BaseException | None) -> None:
        splice, self.splice, self._state = self.splice, None, _OFF
        if splice is not None:
            splice.finish(LOST)
        super().connection_lost(exc)

    def _head(self, buf: bytes) -> None:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _HOLD_LIMIT:
                self._off(buf)
            else:
                self._held = buf
            return
        end += 4
        head = buf[:end]
        if head[9:10] == b"1" or not _CHUNKED.search(head.lower()):  # 1xx, or not chunked
            self._off(buf)
            return
        self._state, self._held = _BODY, b""
        super().data_received(head)
        if end < len(buf) and self._state == _BODY:
            self._body(buf[end:])

    def _body(self, buf: bytes) -> None:
        try:
            end, last = _whole_chunks(buf)
        except ValueError:
            last, end = True, 0
        if last:  # the parser takes it from here: last chunk, trailers, a bad frame
            self._off(buf)
            return
        self._held = buf[end:]
        if end:
            super().data_received(buf if end == len(buf) else buf[:end])
        if len(self._held) > _HOLD_LIMIT:
            self._off(self._held)

    def _off(self, buf: bytes) -> None:
        self._state, self._held = _OFF, b""
        if buf:
            super().data_received(buf)

    def take(self, splice: Splice) -> bytes:
        """Hand the answer's bytes to ``splice`` from now on; returns the bytes held so far."""
        held, self._held = self._held, b""
        self.splice = splice
        self.read_timeout = None  # the splice keeps the idle deadline
        self._drop_timeout()
        return held

    def give_back(self, rest: bytes, idle: float | None) -> None:
        """The last chunk came: aiohttp's parser reads it (and what follows) and ends the answer."""
        self.splice, self._state = None, _OFF
        self.read_timeout = idle
        if rest:
            super().data_received(rest)


def _whole_chunks(buf: bytes) -> tuple[int, bool]:
    """Where the whole chunks at the start of ``buf`` end, and whether the last chunk starts
    there. ValueError: not chunked encoding."""
    pos, n = 0, len(buf)
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if n - pos > _SIZE_LINE_LIMIT:
                raise ValueError("chunk size line too long")
            return pos, False
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            return pos, True
        following = eol + 4 + size
        if following > n:
            return pos, False
        pos = following


class Splice:
    """One answer relayed from an upstream connection to a client's transport."""

    def __init__(
        self,
        handler: SpliceHandler,
        client: asyncio.Transport,
        writer: Any,
        watcher: StreamWatcher,
        on_token: Callable[[], None],
    ) -> None:
        self.result: str | None = None
        self._handler, self._client, self._writer = handler, client, writer
        self._watcher, self._on_token = watcher, on_token
        self._started = watcher.tokens
        self._idle = handler.read_timeout
        self._high = client.get_write_buffer_limits()[1]
        self._left = 0
        """Bytes of the current chunk not yet seen: its data, then its CRLF."""
        self._pending = b""
        """The start of a chunk size line, not yet written."""
        self._paused = False
        self._last = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._wake: asyncio.Future[None] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        if self._idle:
            self._timer = self._loop.call_later(self._idle, self._tick)

    def relay(self, data: bytes) -> None:
        """Upstream bytes: write them to the client; look at the chunks they carry."""
        if self.result is not None:
            return  # ended: the caller closes the connection
        self._last = time.monotonic()
        buf = self._pending + data if self._pending else data
        pos, n, left = 0, len(buf), self._left
        pieces: list[bytes] = []
        last = -1
        while pos < n:
            if left:
                take = min(left, n - pos)
                if left > 2:
                    pieces.append(buf[pos : pos + min(take, left - 2)])
                pos += take
                left -= take
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            try:
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
            except ValueError:
                size = -1
            if size <= 0:
                last = pos
                break
            left = size + 2
            pos = eol + 2
        self._left = left
        if last >= 0:
            out, self._pending = buf[:last], b""
        else:
            out, self._pending = (buf, b"") if pos >= n else (buf[:pos], buf[pos:])
        client = self._client
        if client.is_closing():
            self.finish(GONE)
            return
        if out:
            client.write(out)
        watcher = self._watcher
        for piece in pieces:
            watcher.feed(piece)
        if not self._started and watcher.tokens:
            self._started = True
            self._on_token()
        if last >= 0:
            if size < 0:
                self.finish(BAD)
            else:
                self.finish(DONE)
                self._handler.give_back(buf[last:], self._idle)
        elif len(self._pending) > _SIZE_LINE_LIMIT:
            self.finish(BAD)
        elif client.get_write_buffer_size() > self._high and not self._paused:
            self._paused = True  # the client is slower than the model: stop reading upstream
            self._handler.pause_reading()
            self._signal()

    def pad(self) -> bytes:
        """What completes a chunk cut off by a break, so an error line can follow it."""
        left, self._left = self._left, 0
        if left > 2:
            return b" " * (left - 3) + b"\n\r\n"
        return b"\r\n"[2 - left :]

    def finish(self, result: str) -> None:
        if self.result is None:
            self.result = result
            if self._timer is not None:
                self._timer.cancel()
            self._signal()

    async def run(self) -> str:
        """Wait for the end (and for the client to drain when it is slow); how it ended."""
        try:
            while self.result is None:
                await self._wake
                self._wake = self._loop.create_future()
                if self._paused and self.result is None:
                    await self._writer.drain()
                    self._paused = False
                    self._last = time.monotonic()
                    self._handler.resume_reading()
        except ConnectionError:
            self.finish(GONE)
        except BaseException:  # cancelled: the client left (or the proxy stops)
            self.finish(GONE)
            raise
        assert self.result is not None
        return self.result

    def _signal(self) -> None:
        if not self._wake.done():
            self._wake.set_result(None)

    def _tick(self) -> None:
        assert self._idle is not None
        quiet = time.monotonic() - self._last
        if self._paused:
            self._timer = self._loop.call_later(self._idle, self._tick)
        elif quiet >= self._idle:
            self.finish(TIMEOUT)
        else:
            self._timer = self._loop.call_later(self._idle - quiet, self._tick)


async def relay(
    request: web.Request,
    out: web.StreamResponse,
    resp: aiohttp.ClientResponse,
    watcher: StreamWatcher,
    on_token: Callable[[], None],
) -> Splice | None:
    """Take the answer over (``out`` prepared); None: it cannot be, relay it through aiohttp.

    What aiohttp has read already is written first; then the returned splice relays the rest
    (await its ``run()``).
    """
    handler = resp.connection.protocol if resp.connection is not None else None
    if (
        not isinstance(handler, SpliceHandler)
        or request.method == "HEAD"
        or out.compression
        or out.headers.get("Transfer-Encoding") != "chunked"
    ):
        return None
    content = resp.content
    while handler.spliceable:
        try:
            data = content.read_nowait()
        except Exception:  # the answer broke: the caller's read says how
            return None
        if not data:
            break
        watcher.feed(data)
        if watcher.tokens:
            on_token()
        await out.write(data)
    client = request.transport
    if not handler.spliceable or client is None or client.is_closing():
        return None  # the answer ended meanwhile, or the client left: the caller sees which
    send_headers = getattr(request.writer, "send_headers", None)
    if send_headers is not None:
        send_headers()  # if no body went yet: the raw bytes must follow the headers
    splice = Splice(handler, client, request.writer, watcher, on_token)
    held = handler.take(splice)
    if held:
        splice.relay(held)
    return splice
