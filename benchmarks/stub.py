"""A fast fake Ollama for the overhead benchmark: paced NDJSON token streams at little CPU cost.

The emulator spends ~60 us of CPU per token (per-sequence timers, JSON, aiohttp), so on a small
machine it, not the proxy, would limit how many chunks per second flow. This stub answers
``/api/chat`` and ``/api/generate`` with Ollama-shaped NDJSON lines, one HTTP chunk per token,
paced at ``rate`` tokens per second per stream by one timer heap for all streams, over a raw
asyncio protocol (HTTP/1.1 keep-alive, Content-Length request bodies). It also answers ``/``,
``/api/tags``, ``/api/ps`` and ``/api/version`` so that ollamux treats it as a warm instance.

    python -m benchmarks.stub --listen 127.0.0.1:PORT [--rate 100] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import json
import signal
import sys
from collections.abc import Sequence

MODEL = "llama3.2:1b"
_LINE = (
    json.dumps(
        {
            "model": MODEL,
            "created_at": "2026-01-01T00:00:00.000000Z",
            "message": {"role": "assistant", "content": " token"},
            "done": False,
        },
        separators=(",", ":"),
    ).encode()
    + b"\n"
)
_MODEL_ENTRY = {
    "name": MODEL,
    "model": MODEL,
    "size": 1_300_000_000,
    "digest": "0" * 64,
    "details": {"format": "gguf", "family": "llama", "parameter_size": "1.2B"},
}


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _final(tokens: int) -> bytes:
    final = {
        "model": MODEL,
        "created_at": "2026-01-01T00:00:00.000000Z",
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "length",
        "total_duration": 1,
        "load_duration": 1,
        "prompt_eval_count": 8,
        "prompt_eval_duration": 1,
        "eval_count": tokens,
        "eval_duration": 1,
    }
    return _chunk(json.dumps(final, separators=(",", ":")).encode() + b"\n") + b"0\r\n\r\n"


def _response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
)
_STATIC = {
    "/": _response("200 OK", b"Ollama is running", "text/plain; charset=utf-8"),
    "/api/version": _response("200 OK", b'{"version":"0.32.15"}'),
    "/api/tags": _response("200 OK", json.dumps({"models": [_MODEL_ENTRY]}).encode()),
    "/api/ps": _response(
        "200 OK",
        json.dumps(
            {
                "models": [
                    _MODEL_ENTRY
                    | {
                        "size_vram": 1_300_000_000,
                        "context_length": 4096,
                        "expires_at": "2300-01-01T00:00:00Z",
                    }
                ]
            }
        ).encode(),
    ),
}


class Pacer:
    """One timer heap that writes every stream's next token when it is due."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._heap: list[tuple[float, int, _Conn]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()

    def add(self, conn: _Conn, due: float) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), conn))
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._heap:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            while self._heap and self._heap[0][0] <= now:
                due, _, conn = heapq.heappop(self._heap)
                if conn.token(due):
                    heapq.heappush(self._heap, (due + self.interval, next(self._seq), conn))
            if self._heap:
                self._wake.clear()
                delay = self._heap[0][0] - loop.time()
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)


class _Conn(asyncio.Protocol):
    def __init__(self, pacer: Pacer, tokens: int) -> None:
        self._pacer = pacer
        self._default_tokens = tokens
        self._buf = b""
        self._left = 0
        self._tokens = 0
        self._streaming = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._serve()

    def _serve(self) -> None:
        while not self._streaming and self._transport is not None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self._buf[:end].decode("latin-1").split("\r\n")
            method, path = lines[0].split(" ")[:2]
            length = 0
            for header in lines[1:]:
                name, _, value = header.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self._buf) < end + 4 + length:
                return
            body = self._buf[end + 4 : end + 4 + length]
            self._buf = self._buf[end + 4 + length :]
            self._request(method, path.split("?")[0], body)

    def _request(self, method: str, path: str, body: bytes) -> None:
        assert self._transport is not None
        if method in ("GET", "HEAD") and path in _STATIC:
            self._transport.write(_STATIC[path])
        elif method == "POST" and path in ("/api/chat", "/api/generate"):
            try:
                options = json.loads(body).get("options") or {}
                tokens = int(options.get("num_predict", self._default_tokens))
            except (ValueError, AttributeError, TypeError):
                tokens = self._default_tokens
            self._tokens = self._left = max(tokens, 1)
            self._streaming = True
            self._transport.write(_STREAM_HEAD)
            self.token(0.0)  # the first token goes out at once: TTFT is the HTTP path only
            if self._streaming:
                self._pacer.add(self, asyncio.get_running_loop().time() + self._pacer.interval)
        else:
            self._transport.write(_response("404 Not Found", b"404 page not found", "text/plain"))

    def token(self, _due: float) -> bool:
        """Write one token (and the final line after the last); whether more are to come."""
        if self._transport is None or not self._streaming:
            return False
        self._transport.write(_chunk(_LINE))
        self._left -= 1
        if self._left > 0:
            return True
        self._transport.write(_final(self._tokens))
        self._streaming = False
        self._serve()  # a pipelined next request
        return False


async def serve(host: str, port: int, *, rate: float, tokens: int) -> None:
    pacer = Pacer(rate)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Conn(pacer, tokens), host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    pacing = loop.create_task(pacer.run())
    async with server:
        await stop.wait()
    pacing.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stub", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:11500")
    parser.add_argument("--rate", type=float, default=100.0, help="tokens/s per stream")
    parser.add_argument("--tokens", type=int, default=64, help="tokens without num_predict")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    asyncio.run(serve(host, int(port), rate=args.rate, tokens=args.tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
