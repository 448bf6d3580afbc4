"""Request bodies and client connections at the proxy's edge, through real sockets.

``limits.max_body`` refuses large bodies with 413 in Ollama's shape; a large body is parsed off
the event loop; blob uploads stream to an instance whatever their size; a client that trickles
its request head, or idles, is disconnected after ``limits.client_idle``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.api import body as body_module
from proxy.api.context import PROXY
from tests.integration.farm import Farm, farm

MODEL = "llama3.2:1b"
MIB = 1024**2
LIMIT = 1 * MIB
"""The small ``limits.max_body`` of the tests that are about that setting."""
WAIT = 10.0
"""Bound on every wait for the proxy to act: a failing test ends, it never hangs."""


def chat(size: int = 0, *, stream: bool = False) -> bytes:
    """A chat body of exactly ``size`` bytes (padded by a field Ollama ignores), or a small one."""
    payload: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_predict": 4},
        "stream": stream,
        "pad": "",
    }
    small = json.dumps(payload).encode()
    if size:
        payload["pad"] = "x" * (size - len(small))
    body = json.dumps(payload).encode()
    assert not size or len(body) == size
    return body


async def chunked(data: bytes, piece: int = 64 * 1024) -> AsyncIterator[bytes]:
    """``data`` as a body without Content-Length (aiohttp sends it chunked)."""
    for start in range(0, len(data), piece):
        yield data[start : start + piece]


async def post(
    url: str, path: str, data: Any, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    timeout = aiohttp.ClientTimeout(total=60)
    if isinstance(data, bytes):
        data = io.BytesIO(data)  # sent with its Content-Length, in pieces
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.post(url + path, data=data, headers=headers) as r,
    ):
        return r.status, await r.read()


async def status_of(method: str, url: str) -> int:
    async with aiohttp.ClientSession() as s, s.request(method, url) as r:
        await r.read()
        return r.status


async def raw(url: str, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain TCP connection to the proxy that has sent ``head`` (any bytes)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    await writer.drain()
    return reader, writer


async def closed_by_peer(reader: asyncio.StreamReader) -> bytes:
    """Everything the proxy sends until it closes the connection (bounded by WAIT)."""
    return await asyncio.wait_for(reader.read(), WAIT)


async def response(reader: asyncio.StreamReader) -> tuple[bytes, bytes, bytes]:
    """Status line, headers and body of one answer with a Content-Length (bounded by WAIT)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    status_line, _, headers = head.partition(b"\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in headers.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return status_line, headers, await asyncio.wait_for(reader.readexactly(length), WAIT)


def close(writer: asyncio.StreamWriter) -> None:
    writer.close()


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Farm]:
    async with farm(tmp_path) as f:
        yield f


@pytest.fixture
async def small_limit(tmp_path: Path) -> AsyncIterator[Farm]:
    async with farm(tmp_path, limits={"max_body": LIMIT}) as f:
        yield f


# --- limits.max_body --------------------------------------------------------------------------


async def test_a_declared_body_over_the_default_limit_is_refused_before_it_is_sent(
    box: Farm,
) -> None:
    """Shipped defaults: 64 MiB. The 413 comes from Content-Length alone, and the connection
    closes after it, since the client may still be sending."""
    head = (
        b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (64 * MIB + 1)
    )
    reader, writer = await raw(box.url, head)
    try:
        status_line, headers, payload = await response(reader)
    finally:
        close(writer)
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"
    assert b"Connection: close" in headers and b"application/json" in headers
    message = json.loads(payload)["error"]
    assert "64.0 MiB" in message and "limits.max_body" in message


@pytest.mark.parametrize("how", ["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_a_body_over_max_body_gets_413_in_the_apis_error_shape(
    small_limit: Farm, path: str, how: str
) -> None:
    over = chat(LIMIT + 1)
    status, payload = await post(
        small_limit.url, path, over if how == "content-length" else chunked(over)
    )
    assert status == 413
    error = json.loads(payload)["error"]
    if path.startswith("/v1/"):
        assert error["type"] == "invalid_request_error" and error["code"] is None
        error = error["message"]
    assert "1.0 MiB" in error and "limits.max_body" in error
    # the proxy is fine afterwards, and a body of exactly the limit is served
    for data in (chat(LIMIT), chunked(chat(LIMIT))):
        status, payload = await post(small_limit.url, "/api/chat", data)
        assert status == 200, payload[:200]
        assert json.loads(payload)["done"] is True


async def test_the_413_names_the_limit_on_every_route(small_limit: Farm) -> None:
    """Routes that pass bodies through as they are (show, create, pull, unknown paths) are held
    to the same limit, declared or chunked."""
    over = b"{" + b" " * LIMIT + b"}"
    for path in ("/api/show", "/api/create", "/api/pull", "/api/something-new"):
        for data in (over, chunked(over)):
            status, payload = await post(small_limit.url, path, data)
            assert status == 413 and "limits.max_body" in json.loads(payload)["error"], path


# --- parsing off the event loop -------------------------------------------------------------


async def test_other_requests_are_answered_while_a_large_body_is_parsed(
    box: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4 MiB chat (16 times what is parsed inline) is held in its parse, in the worker thread,
    until the test lets it go; meanwhile the proxy answers GET / and a small chat. A parse on the
    event loop would block the loop and the test with it: the hold would end by its own timeout
    instead. (The size does not matter to the proof; the emulator behind decodes JSON slowly.)"""
    started, release = threading.Event(), threading.Event()
    released: list[bool] = []
    loads = body_module._loads

    def held(data: bytes) -> Any:
        started.set()
        released.append(release.wait(WAIT))
        return loads(data)

    monkeypatch.setattr(body_module, "_loads", held)
    large = asyncio.create_task(post(box.url, "/api/chat", chat(4 * MIB, stream=True)))
    try:
        assert await asyncio.to_thread(started.wait, WAIT), "the large body was not parsed"
        async with aiohttp.ClientSession() as s:
            async with s.get(box.url + "/") as r:
                assert r.status == 200 and await r.text() == "Ollama is running"
            async with s.post(box.url + "/api/chat", data=chat()) as r:
                assert r.status == 200 and (await r.json())["done"] is True
        assert not large.done()  # still parsing: the answers above did not wait for it
    finally:
        release.set()
    status, payload = await asyncio.wait_for(large, WAIT * 3)
    assert released == [True]  # the test, not the timeout, ended the hold
    assert status == 200
    assert json.loads(payload.splitlines()[-1])["done"] is True


# --- /api/blobs -------------------------------------------------------------------------------


def blob(size: int, seed: bytes = b"") -> tuple[bytes, str]:
    data = (seed + b"0123456789abcdef" * (size // 16 + 1))[:size]
    return data, "/api/blobs/sha256:" + hashlib.sha256(data).hexdigest()


async def test_a_blob_larger_than_max_body_streams_to_an_instance(small_limit: Farm) -> None:
    url = small_limit.url
    data, path = blob(3 * LIMIT)
    assert await status_of("HEAD", url + path) == 404
    status, payload = await post(url, path, data)  # with Content-Length
    assert status == 201, payload
    assert await status_of("HEAD", url + path) == 200
    for server in small_limit.servers:  # one shared store: every instance sees it
        assert await status_of("HEAD", str(server.make_url(path))) == 200
    status, _ = await post(url, path, chunked(data))  # again, chunked: already there
    assert status == 200
    other, other_path = blob(2 * LIMIT, seed=b"other")
    status, _ = await post(url, other_path, chunked(other))
    assert status == 201 and await status_of("HEAD", url + other_path) == 200
    status, payload = await post(url, path, b"not the blob")  # Ollama's own 400 comes back
    assert status == 200 or (status == 400 and b"digest mismatch" in payload)


async def test_a_blob_upload_that_cannot_connect_goes_to_the_next_instance(box: Farm) -> None:
    proxy = box.proxy_server.app[PROXY]
    first = proxy.router.routable()[0]
    first.url = "http://127.0.0.1:9"  # refuses connections, before any of the body was read
    data, path = blob(LIMIT)
    status, payload = await post(box.url, path, chunked(data))
    assert status == 201, payload
    assert await status_of("HEAD", str(box.servers[1].make_url(path))) == 200
    errors = box.sample("ollamux_upstream_errors_total", {"backend": first.name, "kind": "connect"})
    assert errors == 1


async def test_a_client_that_leaves_mid_upload_stores_nothing(small_limit: Farm) -> None:
    data, path = blob(2 * LIMIT)
    head = b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (
        path.encode(),
        len(data),
    )
    _, writer = await raw(small_limit.url, head + data[: LIMIT // 2])
    await asyncio.sleep(0.2)  # let part of it reach the instance
    close(writer)
    await writer.wait_closed()
    assert await status_of("HEAD", small_limit.url + path) == 404
    status, _ = await post(small_limit.url, path, data)  # and the next upload is served
    assert status == 201


# --- client connections: limits.client_idle ----------------------------------------------------


async def test_a_client_that_trickles_its_request_head_is_disconnected(tmp_path: Path) -> None:
    async with farm(tmp_path, limits={"client_idle": 0.5}) as box:
        reader, writer = await raw(box.url, b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\n")
        try:
            for _ in range(3):  # a header now and then does not keep it open
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
            assert await closed_by_peer(reader) == b""  # closed without an answer
        finally:
            close(writer)
        # an idle keep-alive connection is closed too, after its answer
        reader, writer = await raw(box.url, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try:
            answer = await closed_by_peer(reader)
        finally:
            close(writer)
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"Ollama is running")


async def test_an_answer_longer_than_client_idle_is_not_cut(tmp_path: Path) -> None:
    async with farm(tmp_path, speed=5.0, limits={"client_idle": 0.3}) as box:
        client = box.ollama()
        parts = [
            part
            async for part in await client.generate(
                model=MODEL, prompt="hi", stream=True, options={"num_predict": 600}
            )
        ]
        assert parts[-1].done and parts[-1].eval_count == 600


async def test_a_body_that_stalls_gets_408(tmp_path: Path) -> None:
    async with farm(tmp_path, limits={"client_idle": 0.5, "max_body": LIMIT}) as box:
        for path in ("/api/chat", blob(LIMIT)[1]):
            head = (
                b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n"
                % path.encode()
            )
            reader, writer = await raw(box.url, head + b'{"model": ')
            try:
                status_line, headers, payload = await response(reader)
            finally:
                close(writer)
            assert status_line.startswith(b"HTTP/1.1 408 "), (path, status_line)
            assert b"Connection: close" in headers
            assert "limits.client_idle" in json.loads(payload)["error"]
