"""The health probes through real sockets: /proxy/live and /proxy/ready over the emulated farm,
with every instance down or drained, behind API keys, and while the proxy drains after a stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.api.context import PROXY
from proxy.api.stopping import GATE
from proxy.app import build_app, serve_proxy
from proxy.config import ModelSpec, config_from_dict
from proxy.keystore import add_key
from tests.conftest import MakeEmulator
from tests.integration.farm import Farm, farm
from tests.processes import free_ports


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def probe(
    client: aiohttp.ClientSession, url: str, path: str, method: str = "GET"
) -> tuple[int, Any]:
    async with client.request(method, url + path) as response:
        body = await response.read()
        if method == "HEAD":
            return response.status, None
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        return response.status, json.loads(body)


async def until_ready_says(client: aiohttp.ClientSession, box: Farm, status: int) -> dict[str, Any]:
    """/proxy/ready's body once it answers ``status`` (the monitor's next round decides)."""
    for _ in range(300):
        code, body = await probe(client, box.url, "/proxy/ready")
        if code == status:
            assert isinstance(body, dict)
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"/proxy/ready never answered {status}: {code} {body}")


async def test_live_and_ready_answer_200_while_instances_serve(
    client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with farm(tmp_path) as box:
        assert await probe(client, box.url, "/proxy/live") == (200, {"status": "live"})
        assert await probe(client, box.url, "/proxy/ready") == (
            200,
            {"status": "ready", "routable": 4, "instances": 4},
        )
        assert await probe(client, box.url, "/proxy/live", "HEAD") == (200, None)
        assert await probe(client, box.url, "/proxy/ready", "HEAD") == (200, None)


async def test_ready_is_503_once_every_instance_is_down_and_live_stays_200(
    client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with farm(tmp_path, gpus=(24, 24)) as box:
        for server in box.servers:
            await server.close()
        body = await until_ready_says(client, box, 503)
        assert body == {
            "error": "no instance can serve yet",
            "status": "not ready",
            "routable": 0,
            "instances": 2,
        }
        assert await probe(client, box.url, "/proxy/live") == (200, {"status": "live"})


async def test_ready_follows_drains_every_instance_drained_is_503(
    client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with farm(tmp_path, gpus=(24, 24)) as box:
        router = box.proxy_server.app[PROXY].router
        first, second = router.instances
        router.set_draining(first, True)
        assert (await until_ready_says(client, box, 200))["routable"] == 1
        router.set_draining(second, True)
        status, body = await probe(client, box.url, "/proxy/ready")
        assert status == 503 and body["error"] == "no instance can serve yet"
        assert body["routable"] == 0
        assert (await probe(client, box.url, "/proxy/live"))[0] == 200
        router.set_draining(second, False)
        assert await probe(client, box.url, "/proxy/ready") == (
            200,
            {"status": "ready", "routable": 1, "instances": 2},
        )


async def test_probes_need_no_key_even_with_protect_status(
    client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    add_key(keys, "webui")
    auth = {"keys_file": str(keys), "protect_status": True}
    async with farm(tmp_path, gpus=(24,), auth=auth) as box:
        async with client.get(box.url + "/proxy/status") as response:
            assert response.status == 401  # the status stays behind the key
        assert await probe(client, box.url, "/proxy/live") == (200, {"status": "live"})
        assert (await probe(client, box.url, "/proxy/ready"))[0] == 200
        async with client.post(box.url + "/proxy/ready") as response:
            assert response.status == 401  # only GET and HEAD are open


CRAWL = ModelSpec(name="crawl:1b", size_gb=0.5, parameters="1.0B", decode_tps=0.2,
                  prompt_tps=20000, load_gbps=10, kv_kib_per_token=16)  # fmt: skip
"""About 40 tokens per real second at the test emulator's time compression: a stream still runs
when the stop comes."""


async def test_while_draining_ready_says_stopping_live_says_live_and_the_rest_is_refused(
    make_emulator: MakeEmulator, tmp_path: Path
) -> None:
    emulator = await make_emulator(models=(CRAWL,), root=tmp_path / "models")
    (port,) = free_ports(1)
    raw = {
        "listen": f"127.0.0.1:{port}",
        "instances": [{"name": "e", "launcher": "external", "url": emulator.url}],
        "timeouts": {"drain": 30},
    }
    config = config_from_dict(raw, source="test")
    app = build_app(config)
    stop, cut = asyncio.Event(), asyncio.Event()
    server = asyncio.ensure_future(
        serve_proxy(app, config.listen, stop=stop, cut=cut, drain=config.timeouts.drain)
    )
    url = f"http://127.0.0.1:{port}"
    # One kept-alive connection for the probes: after the stop, the listening socket is closed
    # and only connections already open reach the proxy.
    prober = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
    streamer = aiohttp.ClientSession()
    try:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                if (await probe(prober, url, "/proxy/ready"))[0] == 200:
                    break
            await asyncio.sleep(0.05)
        body = {"model": CRAWL.name, "prompt": "hi", "options": {"num_predict": 4000}}
        async with streamer.post(url + "/api/generate", json=body) as stream:
            assert stream.status == 200
            await stream.content.readline()  # streaming now
            stop.set()
            while not app[GATE].closed:
                await asyncio.sleep(0.01)
            assert await probe(prober, url, "/proxy/ready") == (
                503,
                {
                    "error": "the proxy is stopping and takes no new requests",
                    "status": "stopping",
                    "routable": 1,
                    "instances": 1,
                },
            )
            assert await probe(prober, url, "/proxy/live") == (200, {"status": "live"})
            assert app[GATE].in_flight == 1  # the probes did not count, the stream does
            async with prober.get(url + "/api/tags") as refused:
                assert refused.status == 503  # everything else is refused meanwhile
            cut.set()
    finally:
        await prober.close()
        await streamer.close()
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
