"""Instance admin through the proxy: drain, undrain, restart, and who may ask for them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from proxy.api.instance_admin import is_loopback
from proxy.app import build_app
from proxy.config import config_from_dict
from tests.integration.farm import Farm, farm

MODEL = "llama3.2:1b"
LONG = 1500
"""Tokens of the long stream: about a second at the farm's speed of 5."""


async def instances(url: str) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(url + "/proxy/instances") as r:
        assert r.status == 200
        return {i["name"]: i for i in (await r.json())["instances"]}


async def admin(url: str, name: str, action: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(f"{url}/proxy/instances/{name}/{action}") as r:
        assert r.status == 200, await r.text()
        entry: dict[str, Any] = await r.json()
        return entry


async def generate(url: str) -> int:
    payload = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 4}}
    async with aiohttp.ClientSession() as s, s.post(url + "/api/generate", json=payload) as r:
        await r.read()
        return r.status


def served(box: Farm, name: str) -> float:
    labels = {"endpoint": "/api/generate", "model": MODEL, "backend": name, "code": "200"}
    return box.sample("ollamux_requests_total", labels)


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Farm]:
    async with farm(tmp_path, gpus=(24, 24), speed=5.0) as f:
        yield f


async def test_a_drained_instance_gets_no_new_requests_and_finishes_those_in_flight(
    box: Farm,
) -> None:
    payload = {"model": MODEL, "prompt": "tell me", "options": {"num_predict": LONG}}
    async with aiohttp.ClientSession() as session:
        async with session.post(box.url + "/api/generate", json=payload) as stream:
            assert stream.status == 200
            await stream.content.readline()  # the first token: it runs somewhere now
            busy = [n for n, i in (await instances(box.url)).items() if i["inflight"] == 1]
            assert len(busy) == 1
            drained = busy[0]
            other = "gpu1" if drained == "gpu0" else "gpu0"

            entry = await admin(box.url, drained, "drain")
            assert entry["state"] == "draining" and entry["inflight"] == 1
            statuses = [await generate(box.url) for _ in range(4)]
            assert statuses == [200] * 4
            assert served(box, other) == 4 and served(box, drained) == 0

            last: dict[str, Any] = {}
            async for line in stream.content:  # the request in flight runs to its end
                last = json.loads(line)
        assert last["done"] is True and last["eval_count"] == LONG
    assert served(box, drained) == 1
    assert (await instances(box.url))[drained]["inflight"] == 0

    entry = await admin(box.url, drained, "undrain")
    assert entry["state"] == "up" and not entry["draining"]
    await admin(box.url, other, "drain")
    assert await generate(box.url) == 200
    assert served(box, drained) == 2  # it takes requests again

    await admin(box.url, drained, "drain")  # every instance drained: nowhere to go
    assert await generate(box.url) == 503
    listed = await instances(box.url)
    assert {i["state"] for i in listed.values()} == {"draining"}
    assert listed[other]["launcher"] == "emulated" and listed[other]["process"] == ""


def app_for(**raw: Any) -> Any:
    raw.setdefault(
        "instances",
        [
            {"name": "ext", "launcher": "external", "url": "http://127.0.0.1:9"},
            {"name": "local", "gpu": "GPU-a", "port": 9},
        ],
    )
    return build_app(config_from_dict(raw))


async def post(client: TestClient[Any, Any], path: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with client.post(path, headers=headers) as r:
        return r.status, await r.json(), r.headers


async def test_beyond_loopback_admin_actions_need_a_token(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(app_for(listen="0.0.0.0:11434"))
    status, body, _ = await post(client, "/proxy/instances/ext/drain")
    assert status == 403
    assert "beyond loopback, and no admin_token is set" in body["error"]
    async with client.get("/proxy/instances") as r:  # reading is not an action
        assert r.status == 200


async def test_with_a_token_admin_actions_need_it(aiohttp_client: AiohttpClient) -> None:
    token = "s3cret-token-0123456789"
    client = await aiohttp_client(app_for(listen="0.0.0.0:11434", admin_token=token))
    for given in (None, "wrong-token-0123456789"):
        status, body, headers = await post(client, "/proxy/instances/ext/drain", given)
        assert status == 401 and "Authorization: Bearer" in body["error"]
        assert headers["WWW-Authenticate"].startswith("Bearer")
    status, body, _ = await post(client, "/proxy/instances/ext/drain", token)
    assert status == 200 and body["draining"] is True
    status, body, _ = await post(client, "/proxy/instances/nope/drain", token)
    assert status == 404 and "the instances are ext, local" in body["error"]


async def test_restart_goes_through_the_launcher_or_says_why_not(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await aiohttp_client(app_for())  # loopback, no token: allowed
    status, body, _ = await post(client, "/proxy/instances/ext/restart")
    assert status == 409 and "is external: ollamux does not run it" in body["error"]
    status, body, _ = await post(client, "/proxy/instances/local/restart")
    assert status == 502 and "was not started by this proxy" in body["error"]


def test_loopback_addresses() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.com"))
